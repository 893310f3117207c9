"""PyTorch networks to ONNX graphs: dynamic batch, height and width axes, identity metadata.

The segmenters are exported as they are; the QC module through :func:`qc_export_module`, which
puts its input mode (``"onehot"`` or probabilities) inside the graph.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.deploy.onnx.errors import ExportError
from qcloop.monitor import __version__

__all__ = [
    "EXPORTERS",
    "copy_proto",
    "opset_of",
    "qc_divisor",
    "qc_export_module",
    "read_metadata",
    "reweighted",
    "set_metadata",
    "to_onnx",
]

EXPORTERS = ("dynamo", "torchscript")
#: Loggers of the ONNX exporter stack that report every graph pass at INFO.
_NOISY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._export")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's INFO chatter (graph passes) and its optional-op warnings."""
    saved = {}
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _dynamo_export(
    module: Any, example: Any, names: tuple[str, str], divisor: int, opset: int | None
) -> Any:
    """``torch.onnx.export(dynamo=True)`` with dynamic batch and multiple-of-divisor H, W."""
    import torch

    dim = torch.export.Dim
    batch = dim("batch", min=1, max=65536)
    limit = max(2, 8192 // divisor)
    height = dim("height_blocks", min=1, max=limit)
    width = dim("width_blocks", min=1, max=limit)
    shapes = ({0: batch, 2: height * divisor, 3: width * divisor},)
    with _quiet_exporter():
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[names[0]],
            output_names=[names[1]],
            dynamic_shapes=shapes,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    if program is None:  # pragma: no cover - torch returns the program when f is None
        raise ExportError("torch.onnx.export returned no program")
    return program.model_proto


def _torchscript_export(
    module: Any, example: Any, names: tuple[str, str], opset: int | None
) -> Any:
    """The legacy TorchScript exporter with dynamic batch, height and width axes."""
    import onnx
    import torch

    axes = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with _quiet_exporter():
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=[names[0]],
            output_names=[names[1]],
            dynamic_axes={names[0]: axes, names[1]: axes},
            opset_version=opset or 17,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def to_onnx(
    module: Any,
    example: Any,
    input_name: str,
    output_name: str,
    divisor: int,
    opset: int | None,
    exporter: str,
) -> Any:
    """An ``onnx.ModelProto`` of ``module`` with dynamic batch, height and width axes
    (``exporter``: ``"dynamo"`` or ``"torchscript"``)."""
    module.eval()
    names = (input_name, output_name)
    if exporter == "dynamo":
        return _dynamo_export(module, example, names, divisor, opset)
    return _torchscript_export(module, example, names, opset)


def copy_proto(proto: Any) -> Any:
    """A deep copy of an ``onnx.ModelProto``."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def reweighted(proto: Any, model: Any) -> Any | None:
    """A copy of ``proto`` (exported from a network of the same architecture) holding the
    weights of ``model``: initializers named after its state-dict entries are replaced. None
    when the names, shapes or dtypes do not line up (then the caller exports afresh). The
    parity check of the result guards against anything this misses."""
    from onnx import numpy_helper

    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    copy = copy_proto(proto)
    replaced = 0
    for init in copy.graph.initializer:
        if init.name not in state:
            continue
        old = numpy_helper.to_array(init)
        new = state[init.name]
        if old.shape != new.shape or old.dtype != new.dtype:
            return None
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), init.name))
        replaced += 1
    params = sum(1 for name, _ in model.named_parameters())
    return copy if replaced >= params else None


def set_metadata(proto: Any, metadata: dict[str, Any]) -> None:
    """Replace the ``metadata_props`` of ``proto`` (non-strings as JSON) and check the model."""
    import onnx

    del proto.metadata_props[:]
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value, allow_nan=False)
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, text
    proto.producer_name = "qcloop"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)


def read_metadata(path: str | Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file (strings, as stored)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def opset_of(proto: Any) -> int:
    """The default-domain opset of a model (0 when it imports none)."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def qc_divisor(size: int) -> int:
    """The QC autoencoder halves its input down to a 4x4 latent: sizes are multiples of size/4."""
    return max(1, size // 4)


def qc_export_module(qc: Any) -> Any:
    """The QC network as a module of probabilities -> reconstruction, applying the QC input mode
    (``"onehot"`` replaces the probabilities by the one-hot of their argmax) inside the graph."""
    import torch
    from torch import nn

    class QCGraph(nn.Module):
        def __init__(self, net: nn.Module, onehot: bool, num_classes: int) -> None:
            super().__init__()
            self.net = net
            self.onehot = onehot
            self.num_classes = num_classes

        def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
            x = probabilities
            if self.onehot:
                labels = x.argmax(dim=1)
                x = nn.functional.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).to(x.dtype)
            return self.net(x)

    return QCGraph(qc.net, qc.input == "onehot", qc.num_classes).eval()
