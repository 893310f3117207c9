"""Checks of a whole Triton model repository: every configuration against the schema, each
ONNX model's configuration against its file, and each ensemble's steps against the models they
name."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qcloop.deploy.triton.errors import TritonError
from qcloop.deploy.triton.schema import ENUMS, validate_model_config

__all__ = ["check_repository"]

_ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32"}


def _data_type_name(value: int) -> str:
    return ENUMS["DataType"][value]


def _onnx_signature(path: Path) -> dict[str, dict[str, tuple[str, list[int | str]]]]:
    """Inputs and outputs of an ONNX file: name -> (Triton data type, dims with names for
    symbolic axes)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sig: dict[str, dict[str, tuple[str, list[int | str]]]] = {"input": {}, "output": {}}
    initializers = {i.name for i in model.graph.initializer}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims: list[int | str] = [
                d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim
            ]
            sig[kind][v.name] = (_ONNX_TYPES.get(t.elem_type, f"onnx:{t.elem_type}"), dims)
    return sig


def _dims_compatible(config_dims: list[int], model_dims: list[int | str], batched: bool) -> bool:
    model = model_dims[1:] if batched else model_dims
    if len(model) != len(config_dims):
        return False
    return all(
        isinstance(m, str) or m in (0, -1) or c == m
        for c, m in zip(config_dims, model, strict=True)
    )


def check_repository(repo: str | Path) -> list[str]:
    """Problems of a model repository: every ``config.pbtxt`` against the schema; the tensors of
    each ONNX model's config against the ONNX file; ensemble steps against the models they
    name (tensor names, types and dims). An empty list means none found."""
    root = Path(repo)
    problems: list[str] = []
    configs: dict[str, Any] = {}
    for path in sorted(root.glob("*/config.pbtxt")):
        try:
            config = validate_model_config(path.read_text(encoding="utf-8"), str(path))
        except TritonError as exc:
            problems.append(str(exc))
            continue
        if config.name != path.parent.name:
            problems.append(f"{path}: name {config.name!r} differs from its folder name")
        configs[config.name] = config
    if not configs:
        return [f"{root}: no */config.pbtxt found"]
    for name, config in configs.items():
        if config.platform == "onnxruntime_onnx":
            problems += _check_onnx_model(root, name, config)
    for name, config in configs.items():
        if config.platform == "ensemble":
            problems += _check_ensemble(name, config, configs)
    return problems


def _check_onnx_model(root: Path, name: str, config: Any) -> list[str]:
    """Problems of one ONNX Runtime model: its file, and its tensors against the file's."""
    onnx_path = root / name / "1" / (config.default_model_filename or "model.onnx")
    if not onnx_path.is_file():
        return [f"{onnx_path}: missing model file"]
    problems = []
    sig = _onnx_signature(onnx_path)
    batched = config.max_batch_size > 0
    for kind, tensors in (("input", config.input), ("output", config.output)):
        declared = {t.name for t in tensors}
        if declared != set(sig[kind]):
            problems.append(
                f"{name}: config {kind}s {sorted(declared)} differ from the ONNX model's "
                f"{sorted(sig[kind])}"
            )
            continue
        for t in tensors:
            dtype, dims = sig[kind][t.name]
            if _data_type_name(t.data_type) != dtype:
                problems.append(f"{name}: {kind} {t.name} is {dtype} in the ONNX model")
            if not _dims_compatible(list(t.dims), dims, batched):
                problems.append(
                    f"{name}: {kind} {t.name} dims {list(t.dims)} do not fit the ONNX shape {dims}"
                )
    return problems


def _tensor_table(tensors: Any) -> dict[str, tuple[int, list[int]]]:
    return {t.name: (t.data_type, list(t.dims)) for t in tensors}


def _check_ensemble(name: str, config: Any, configs: Mapping[str, Any]) -> list[str]:
    problems = []
    available = _tensor_table(config.input)  # ensemble tensors known so far
    for i, step in enumerate(config.ensemble_scheduling.step):
        where = f"{name}: step {i} ({step.model_name})"
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"{where}: no such model in the repository")
            continue
        if model.max_batch_size < config.max_batch_size:
            problems.append(f"{where}: max_batch_size {model.max_batch_size} < the ensemble's")
        inputs, outputs = _tensor_table(model.input), _tensor_table(model.output)
        missing = set(inputs) - set(step.input_map)
        if missing:
            problems.append(f"{where}: model inputs {sorted(missing)} are not mapped")
        for model_tensor, ensemble_tensor in step.input_map.items():
            if model_tensor not in inputs:
                problems.append(f"{where}: input_map key {model_tensor!r} is not a model input")
            elif ensemble_tensor not in available:
                problems.append(
                    f"{where}: input_map value {ensemble_tensor!r} is neither an ensemble input "
                    "nor an earlier step's output"
                )
            elif available[ensemble_tensor] != inputs[model_tensor]:
                problems.append(
                    f"{where}: {ensemble_tensor!r} type/dims {available[ensemble_tensor]} differ "
                    f"from model input {model_tensor!r} {inputs[model_tensor]}"
                )
        for model_tensor, ensemble_tensor in step.output_map.items():
            if model_tensor not in outputs:
                problems.append(f"{where}: output_map key {model_tensor!r} is not a model output")
                continue
            if ensemble_tensor in available:
                problems.append(f"{where}: ensemble tensor {ensemble_tensor!r} is produced twice")
            available[ensemble_tensor] = outputs[model_tensor]
    for tensor, spec in _tensor_table(config.output).items():
        if tensor not in available:
            problems.append(f"{name}: ensemble output {tensor!r} is produced by no step")
        elif available[tensor] != spec:
            problems.append(
                f"{name}: ensemble output {tensor!r} type/dims differ from its producer"
            )
    return problems
