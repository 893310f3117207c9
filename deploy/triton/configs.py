"""The ``config.pbtxt`` texts of a qcloop Triton repository: one ONNX Runtime model with
dynamic batching, and the ensemble that runs the best segmenter (softmax applied) then the QC
module."""

from __future__ import annotations

from qcloop.deploy.triton.errors import TritonError
from qcloop.monitor import __version__

__all__ = ["ensemble_config", "onnx_model_config"]


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
