"""A Triton Inference Server model repository from a qcloop ONNX export.

Layout (one set per view; ``v`` is ``sa`` or ``la``)::

    REPO/v_candidate_<i>/config.pbtxt, 1/model.onnx   segmenter i: image -> logits
    REPO/v_segmenter_probs/...                        the best segmenter with a Softmax node
                                                      appended: image -> probabilities
    REPO/v_qc/...                                     QC module: probabilities -> reconstruction
    REPO/v_qc_ensemble/config.pbtxt, 1/               ensemble: image -> probabilities (best
                                                      segmenter) -> reconstruction (QC)
    REPO/qcloop-repository.json                       what was written, from which export

Softmax placement: the QC module takes probabilities, and an ensemble cannot compute by itself,
so the ensemble's first step is ``v_segmenter_probs``: the parity-checked best segmenter graph
with one ``Softmax(axis=1)`` node appended (checked against the logits model when written). The
``v_candidate_<i>`` models keep raw logits for clients that combine candidates themselves.

Every ``config.pbtxt`` is validated before it is written (:func:`validate_model_config`) against a
table of Triton's ``ModelConfig`` message fields written here (:data:`MODEL_CONFIG_SCHEMA`): the
text is parsed strictly by protobuf's text-format parser on message descriptors built from that
table, so an unknown field, a wrong enum value or a value of the wrong type is an error. The
table models the part of ``model_config.proto`` that qcloop writes and its close neighbours; a
field outside it is reported as unknown.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor import __version__
from qcloop.monitor.core.atomic import write_json, write_text

__all__ = [
    "ENUMS",
    "MODEL_CONFIG_SCHEMA",
    "TritonError",
    "check_repository",
    "model_config_class",
    "parse_model_config",
    "validate_model_config",
    "write_repository",
]

REPOSITORY_SUMMARY = "qcloop-repository.json"


class TritonError(RuntimeError):
    """A Triton model repository cannot be written, or a configuration is invalid."""


# --------------------------------------------------------------------------- the schema table
#
# Triton's ModelConfig (model_config.proto, package "inference"), transcribed as a table: for
# each message, field name -> (label, type). label: "optional", "repeated" or "map"; type: a
# scalar type name, an enum name from ENUMS, a message name from this table, or for maps a
# (key type, value type) pair. Oneof groups are listed in ONEOFS.

ENUMS: dict[str, tuple[str, ...]] = {
    "DataType": (
        "TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64",
        "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32",
        "TYPE_FP64", "TYPE_STRING", "TYPE_BF16",
    ),
    "InstanceGroupKind": ("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"),
    "InputFormat": ("FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"),
    "TimeoutAction": ("REJECT", "DELAY"),
}  # fmt: skip

MODEL_CONFIG_SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "ModelConfig": {
        "name": ("optional", "string"),
        "platform": ("optional", "string"),
        "backend": ("optional", "string"),
        "runtime": ("optional", "string"),
        "version_policy": ("optional", "ModelVersionPolicy"),
        "max_batch_size": ("optional", "int32"),
        "input": ("repeated", "ModelInput"),
        "output": ("repeated", "ModelOutput"),
        "dynamic_batching": ("optional", "ModelDynamicBatching"),
        "ensemble_scheduling": ("optional", "ModelEnsembling"),
        "instance_group": ("repeated", "ModelInstanceGroup"),
        "default_model_filename": ("optional", "string"),
        "cc_model_filenames": ("map", ("string", "string")),
        "metric_tags": ("map", ("string", "string")),
        "parameters": ("map", ("string", "ModelParameter")),
        "model_transaction_policy": ("optional", "ModelTransactionPolicy"),
        "response_cache": ("optional", "ModelResponseCache"),
    },
    "ModelVersionPolicy": {
        "latest": ("optional", "VersionLatest"),
        "all": ("optional", "VersionAll"),
        "specific": ("optional", "VersionSpecific"),
    },
    "VersionLatest": {"num_versions": ("optional", "uint32")},
    "VersionAll": {},
    "VersionSpecific": {"versions": ("repeated", "int64")},
    "ModelTensorReshape": {"shape": ("repeated", "int64")},
    "ModelInput": {
        "name": ("optional", "string"),
        "data_type": ("optional", "DataType"),
        "format": ("optional", "InputFormat"),
        "dims": ("repeated", "int64"),
        "reshape": ("optional", "ModelTensorReshape"),
        "is_shape_tensor": ("optional", "bool"),
        "allow_ragged_batch": ("optional", "bool"),
        "optional": ("optional", "bool"),
    },
    "ModelOutput": {
        "name": ("optional", "string"),
        "data_type": ("optional", "DataType"),
        "dims": ("repeated", "int64"),
        "reshape": ("optional", "ModelTensorReshape"),
        "label_filename": ("optional", "string"),
        "is_shape_tensor": ("optional", "bool"),
    },
    "ModelInstanceGroup": {
        "name": ("optional", "string"),
        "kind": ("optional", "InstanceGroupKind"),
        "count": ("optional", "int32"),
        "gpus": ("repeated", "int32"),
        "profile": ("repeated", "string"),
        "passive": ("optional", "bool"),
        "host_policy": ("optional", "string"),
    },
    "ModelQueuePolicy": {
        "timeout_action": ("optional", "TimeoutAction"),
        "default_timeout_microseconds": ("optional", "uint64"),
        "allow_timeout_override": ("optional", "bool"),
        "max_queue_size": ("optional", "uint32"),
    },
    "ModelDynamicBatching": {
        "preferred_batch_size": ("repeated", "int32"),
        "max_queue_delay_microseconds": ("optional", "uint64"),
        "preserve_ordering": ("optional", "bool"),
        "priority_levels": ("optional", "uint64"),
        "default_priority_level": ("optional", "uint64"),
        "default_queue_policy": ("optional", "ModelQueuePolicy"),
    },
    "EnsembleStep": {
        "model_name": ("optional", "string"),
        "model_version": ("optional", "int64"),
        "input_map": ("map", ("string", "string")),
        "output_map": ("map", ("string", "string")),
    },
    "ModelEnsembling": {"step": ("repeated", "EnsembleStep")},
    "ModelParameter": {"string_value": ("optional", "string")},
    "ModelTransactionPolicy": {"decoupled": ("optional", "bool")},
    "ModelResponseCache": {"enable": ("optional", "bool")},
}

#: Oneof groups: message -> group name -> member fields (at most one may be set).
ONEOFS: dict[str, dict[str, tuple[str, ...]]] = {
    # Triton also has sequence_batching in this group; it is outside the table.
    "ModelConfig": {"scheduling_choice": ("dynamic_batching", "ensemble_scheduling")},
    "ModelVersionPolicy": {"policy_choice": ("latest", "all", "specific")},
}

_PACKAGE = "qcloop_triton_schema"


@functools.lru_cache(maxsize=1)
def model_config_class() -> Any:
    """A protobuf message class for ``ModelConfig``, built from :data:`MODEL_CONFIG_SCHEMA`."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(
        name="qcloop_triton_model_config.proto", package=_PACKAGE, syntax="proto3"
    )
    for enum_name, values in ENUMS.items():
        enum = fdp.enum_type.add(name=enum_name)
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    scalar = descriptor_pb2.FieldDescriptorProto
    scalars = {
        "string": scalar.TYPE_STRING,
        "bool": scalar.TYPE_BOOL,
        "int32": scalar.TYPE_INT32,
        "int64": scalar.TYPE_INT64,
        "uint32": scalar.TYPE_UINT32,
        "uint64": scalar.TYPE_UINT64,
        "float": scalar.TYPE_FLOAT,
        "double": scalar.TYPE_DOUBLE,
    }

    def set_type(field: Any, type_name: str) -> None:
        if type_name in scalars:
            field.type = scalars[type_name]
        elif type_name in ENUMS:
            field.type = scalar.TYPE_ENUM
            field.type_name = f".{_PACKAGE}.{type_name}"
        elif type_name in MODEL_CONFIG_SCHEMA:
            field.type = scalar.TYPE_MESSAGE
            field.type_name = f".{_PACKAGE}.{type_name}"
        else:  # pragma: no cover - a mistake in the table
            raise TritonError(f"schema table: unknown type {type_name!r}")

    for message_name, fields in MODEL_CONFIG_SCHEMA.items():
        msg = fdp.message_type.add(name=message_name)
        groups = ONEOFS.get(message_name, {})
        group_index = {}
        for index, group in enumerate(groups):
            msg.oneof_decl.add(name=group)
            for member in groups[group]:
                group_index[member] = index
        for number, (field_name, (label, type_spec)) in enumerate(fields.items(), start=1):
            field = msg.field.add(name=field_name, number=number)
            if label == "map":
                key_type, value_type = type_spec
                entry_name = "".join(p.capitalize() for p in field_name.split("_")) + "Entry"
                entry = msg.nested_type.add(name=entry_name)
                entry.options.map_entry = True
                key = entry.field.add(name="key", number=1, label=scalar.LABEL_OPTIONAL)
                set_type(key, key_type)
                value = entry.field.add(name="value", number=2, label=scalar.LABEL_OPTIONAL)
                set_type(value, value_type)
                field.label = scalar.LABEL_REPEATED
                field.type = scalar.TYPE_MESSAGE
                field.type_name = f".{_PACKAGE}.{message_name}.{entry_name}"
                continue
            field.label = scalar.LABEL_REPEATED if label == "repeated" else scalar.LABEL_OPTIONAL
            set_type(field, type_spec)
            if field_name in group_index:
                field.oneof_index = group_index[field_name]
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ModelConfig"))


def parse_model_config(text: str, source: str = "config.pbtxt") -> Any:
    """Parse ``config.pbtxt`` text strictly against the table; TritonError names the problem."""
    from google.protobuf import text_format

    message = model_config_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise TritonError(f"{source}: not a valid Triton model configuration: {exc}") from exc
    return message


_PLATFORMS = {"onnxruntime_onnx", "ensemble", "tensorrt_plan", "pytorch_libtorch"}


def validate_model_config(text: str, source: str = "config.pbtxt") -> Any:
    """Parse and check one configuration: field names, enum values and types (the parser), then
    what Triton requires of them (a name, a known platform or a backend, tensors with a name, a
    data type and valid dims, an ensemble with steps and no instance groups)."""
    config = parse_model_config(text, source)
    problems = []
    if not config.name:
        problems.append("name: missing")
    if not config.platform and not config.backend:
        problems.append("platform/backend: one of them is required")
    if config.platform and config.platform not in _PLATFORMS:
        problems.append(f"platform: unknown platform {config.platform!r}")
    if config.max_batch_size < 0:
        problems.append(f"max_batch_size: must be >= 0, got {config.max_batch_size}")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        if not tensors:
            problems.append(f"{kind}: at least one is required")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            problems.append(f"{kind}: duplicate names {names}")
        for t in tensors:
            if not t.name:
                problems.append(f"{kind}: a tensor has no name")
            if t.data_type == 0:
                problems.append(f"{kind} {t.name}: data_type missing (TYPE_INVALID)")
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                problems.append(f"{kind} {t.name}: dims must be non-empty, each -1 or > 0")
    batching = config.dynamic_batching
    if config.HasField("dynamic_batching"):
        if config.max_batch_size == 0:
            problems.append("dynamic_batching: needs max_batch_size > 0")
        for size in batching.preferred_batch_size:
            if not 0 < size <= config.max_batch_size:
                problems.append(
                    f"dynamic_batching.preferred_batch_size: {size} is not in "
                    f"1..max_batch_size ({config.max_batch_size})"
                )
    if config.platform == "ensemble":
        if not config.ensemble_scheduling.step:
            problems.append("ensemble_scheduling: an ensemble needs at least one step")
        if config.instance_group:
            problems.append("instance_group: not allowed on an ensemble")
        for i, step in enumerate(config.ensemble_scheduling.step):
            if not step.model_name:
                problems.append(f"ensemble_scheduling.step[{i}]: model_name missing")
            if not step.input_map or not step.output_map:
                problems.append(f"ensemble_scheduling.step[{i}]: input_map and output_map needed")
    elif config.HasField("ensemble_scheduling"):
        problems.append("ensemble_scheduling: only for platform 'ensemble'")
    for i, group in enumerate(config.instance_group):
        if group.count < 0:
            problems.append(f"instance_group[{i}].count: must be >= 0")
        if group.kind in (2, 3) and group.gpus:  # KIND_CPU, KIND_MODEL
            problems.append(f"instance_group[{i}].gpus: not allowed with KIND_CPU/KIND_MODEL")
    if problems:
        raise TritonError(f"{source}: " + "; ".join(problems))
    return config


# --------------------------------------------------------------------------- repository checks

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
        if config.platform != "onnxruntime_onnx":
            continue
        onnx_path = root / name / "1" / (config.default_model_filename or "model.onnx")
        if not onnx_path.is_file():
            problems.append(f"{onnx_path}: missing model file")
            continue
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
                        f"{name}: {kind} {t.name} dims {list(t.dims)} do not fit the ONNX "
                        f"shape {dims}"
                    )
    for name, config in configs.items():
        if config.platform == "ensemble":
            problems += _check_ensemble(name, config, configs)
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


# --------------------------------------------------------------------------- writing


def _tensor_block(kind: str, name: str, dims: list[int]) -> str:
    dims_text = ", ".join(str(d) for d in dims)
    return f'  {{\n    name: "{name}"\n    data_type: TYPE_FP32\n    dims: [ {dims_text} ]\n  }}'


def _tensors(kind: str, tensors: list[tuple[str, list[int]]]) -> str:
    blocks = ",\n".join(_tensor_block(kind, n, d) for n, d in tensors)
    return f"{kind} [\n{blocks}\n]\n"


def _preferred_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (4, 8, 16, 32, 64) if s <= max_batch]
    return sizes or [max_batch]


def onnx_model_config(
    name: str,
    inputs: list[tuple[str, list[int]]],
    outputs: list[tuple[str, list[int]]],
    *,
    max_batch: int,
    kind: str = "gpu",
    note: str = "",
) -> str:
    """``config.pbtxt`` text of an ONNX Runtime model with dynamic batching."""
    if kind not in ("gpu", "cpu"):
        raise TritonError(f"instance kind must be 'gpu' or 'cpu', got {kind!r}")
    sizes = ", ".join(str(s) for s in _preferred_sizes(max_batch))
    group_kind = "KIND_GPU" if kind == "gpu" else "KIND_CPU"
    fallback = (
        "# No GPU on the node? Use kind: KIND_CPU here (or qcloop export-triton --instance-kind cpu)."
        if kind == "gpu"
        else "# CPU instances; qcloop export-triton --instance-kind gpu writes KIND_GPU."
    )
    header = f"# {note}\n" if note else ""
    return (
        f"# Written by qcloop {__version__} (qcloop export-triton).\n{header}"
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch}\n"
        + _tensors("input", inputs)
        + _tensors("output", outputs)
        + "dynamic_batching {\n"
        f"  preferred_batch_size: [ {sizes} ]\n"
        "  max_queue_delay_microseconds: 2000\n"
        "}\n"
        f"{fallback}\n"
        "instance_group [\n"
        "  {\n"
        "    count: 1\n"
        f"    kind: {group_kind}\n"
        "  }\n"
        "]\n"
    )


def ensemble_config(
    name: str,
    segmenter: str,
    qc: str,
    *,
    size: int,
    num_classes: int,
    max_batch: int,
) -> str:
    """``config.pbtxt`` text of the ensemble: segmenter (probabilities) then QC."""
    c, s = num_classes, size
    return (
        f"# Written by qcloop {__version__} (qcloop export-triton).\n"
        "# Runs the best segmenter (softmax applied) then the QC autoencoder on its output.\n"
        f'name: "{name}"\n'
        'platform: "ensemble"\n'
        f"max_batch_size: {max_batch}\n"
        + _tensors("input", [("image", [1, s, s])])
        + _tensors("output", [("probabilities", [c, s, s]), ("reconstruction", [c, s, s])])
        + "ensemble_scheduling {\n"
        "  step [\n"
        "    {\n"
        f'      model_name: "{segmenter}"\n'
        "      model_version: -1\n"
        '      input_map { key: "image" value: "image" }\n'
        '      output_map { key: "probabilities" value: "probabilities" }\n'
        "    },\n"
        "    {\n"
        f'      model_name: "{qc}"\n'
        "      model_version: -1\n"
        '      input_map { key: "probabilities" value: "probabilities" }\n'
        '      output_map { key: "reconstruction" value: "reconstruction" }\n'
        "    }\n"
        "  ]\n"
        "}\n"
    )


def _with_softmax(path: Path, output: str = "probabilities") -> bytes:
    """The segmenter ONNX model at ``path`` with ``Softmax(axis=1)`` appended to its output,
    checked against softmax of the original's logits on random input (max |diff| <= 1e-6)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(path))
    logits = model.graph.output[0]
    model.graph.node.append(helper.make_node("Softmax", [logits.name], [output], axis=1))
    new_output = onnx.ValueInfoProto()
    new_output.CopyFrom(logits)
    new_output.name = output
    del model.graph.output[:]
    model.graph.output.append(new_output)
    for prop in model.metadata_props:
        if prop.key == "softmax_applied":
            prop.value = "true"
        elif prop.key == "output_name":
            prop.value = output
    onnx.checker.check_model(model)
    payload = model.SerializeToString()
    meta = {p.key: p.value for p in model.metadata_props}
    if "input_size" not in meta:
        raise TritonError(f"{path}: no input_size in its metadata; not a qcloop export")
    size = int(meta["input_size"])
    x = np.random.default_rng(0).standard_normal((2, 1, size, size)).astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    base = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    probs = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    (z,) = base.run(None, {base.get_inputs()[0].name: x})
    (p,) = probs.run(None, {probs.get_inputs()[0].name: x})
    e = np.exp(z - z.max(1, keepdims=True))
    diff = float(np.abs(p - e / e.sum(1, keepdims=True)).max())
    if not diff <= 1e-6:
        raise TritonError(f"{path}: softmax variant differs from softmax(logits) by {diff:.2e}")
    return payload


def write_repository(
    onnx_dir: str | Path,
    out: str | Path,
    *,
    max_batch: int = 16,
    kind: str = "gpu",
    views: list[str] | None = None,
) -> dict[str, Any]:
    """Write a Triton model repository for every view of the ONNX export in ``onnx_dir``.

    The repository is staged in a temporary folder, checked (:func:`check_repository`) and
    moved to ``out``; a previous qcloop repository there is replaced, any other non-empty
    folder is refused. ``views`` limits the views (default: every view of the export). Returns
    the summary also written to ``REPO/qcloop-repository.json``.
    """
    from qcloop.deploy.onnx_export import load_manifest, replace_folder

    if max_batch < 1:
        raise TritonError(f"max_batch must be >= 1, got {max_batch}")
    src = Path(onnx_dir)
    manifest = load_manifest(src)
    chosen = list(views) if views else list(manifest["views"])
    missing = [v for v in chosen if v not in manifest["views"]]
    if missing:
        raise TritonError(
            f"{src / 'manifest.json'}: no {', '.join(missing)} models in this export "
            f"(views: {sorted(manifest['views'])})"
        )
    out = Path(out)
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / REPOSITORY_SUMMARY).exists())
    ):
        raise TritonError(
            f"{out}: exists and is not an empty folder nor a qcloop Triton repository; "
            "choose another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    models: dict[str, dict[str, Any]] = {}
    try:
        for view in chosen:
            entry = manifest["views"][view]
            v = view.lower()
            s, c = int(entry["input_size"]), int(entry["num_classes"])
            image, maps = ("image", [1, s, s]), [c, s, s]

            def add(
                name: str, payload: bytes, config: str, role: str, source: str, view: str = view
            ) -> None:
                validate_model_config(config, f"{name}/config.pbtxt")
                (staging / name / "1").mkdir(parents=True)
                (staging / name / "1" / "model.onnx").write_bytes(payload)
                write_text(staging / name / "config.pbtxt", config)
                models[name] = {"view": view, "role": role, "source": source}

            for cand in entry["candidates"]:
                name = f"{v}_candidate_{cand['index']}"
                config = onnx_model_config(
                    name, [image], [("logits", maps)], max_batch=max_batch, kind=kind,
                    note=f"{view} segmenter candidate {cand['index']} (epoch {cand['epoch']}, "
                    f"val Dice {cand['val_dice']:.4f}): logits.",
                )  # fmt: skip
                add(name, (src / cand["file"]).read_bytes(), config, "segmenter", cand["file"])
            best = entry["candidates"][0]
            probs_name = f"{v}_segmenter_probs"
            config = onnx_model_config(
                probs_name, [image], [("probabilities", maps)], max_batch=max_batch, kind=kind,
                note=f"{view} best segmenter with Softmax(axis=1) appended: probabilities.",
            )  # fmt: skip
            add(probs_name, _with_softmax(src / best["file"]), config, "segmenter+softmax",
                best["file"])  # fmt: skip
            qc_name = f"{v}_qc"
            config = onnx_model_config(
                qc_name, [("probabilities", maps)], [("reconstruction", maps)],
                max_batch=max_batch, kind=kind,
                note=f"{view} QC autoencoder: reconstructed probabilities (softmax applied).",
            )  # fmt: skip
            add(
                qc_name, (src / entry["qc"]["file"]).read_bytes(), config, "qc", entry["qc"]["file"]
            )
            ens_name = f"{v}_qc_ensemble"
            config = ensemble_config(
                ens_name, probs_name, qc_name, size=s, num_classes=c, max_batch=max_batch
            )
            validate_model_config(config, f"{ens_name}/config.pbtxt")
            (staging / ens_name / "1").mkdir(parents=True)  # Triton wants a version folder
            write_text(staging / ens_name / "config.pbtxt", config)
            models[ens_name] = {"view": view, "role": "ensemble", "source": ""}
        problems = check_repository(staging)
        if problems:
            raise TritonError("generated repository failed its checks:\n  " + "\n  ".join(problems))
        summary = {
            "format": "qcloop.triton-repository/1",
            "qcloop_version": __version__,
            "onnx_export": str(src.resolve()),
            "run": manifest.get("run"),
            "max_batch_size": max_batch,
            "instance_kind": kind,
            "models": models,
        }
        write_json(staging / REPOSITORY_SUMMARY, summary)
        staging.chmod(0o755)
        replace_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return summary


def read_repository_summary(repo: str | Path) -> dict[str, Any]:
    """The summary a repository was written with."""
    path = Path(repo) / REPOSITORY_SUMMARY
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TritonError(f"{path}: unreadable ({exc})") from exc
