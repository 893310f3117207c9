"""The ``onnx`` model kind of model cards: an ONNX file run by ONNX Runtime.

The CUDA execution provider is asked for when it really loads (see
:func:`qcloop.deploy.onnx.runtime.cuda_usable`), else the CPU provider; the providers in use are
read back from the session. Needs the ``onnx`` extra.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qcloop.monitor.core.model_card import ModelCard
from qcloop.monitor.core.optional import require

__all__ = ["OnnxCardModel", "load_onnx"]


class OnnxCardModel:
    """An ``ExternalModel`` over one ONNX Runtime session (inference only)."""

    kind = "onnx"
    trainable = False
    module = None

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input_name: str = session.get_inputs()[0].name
        self.output_name: str = session.get_outputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """The model's first output for float32 slices ``(N, 1, H, W)``."""
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        return np.asarray(self.session.run([self.output_name], feed)[0])

    def providers(self) -> list[str]:
        """The session's execution providers, as ONNX Runtime reports them."""
        return list(self.session.get_providers())


def _check_signature(card: ModelCard, session: Any) -> None:
    """One image input of rank 4 with one channel (where the graph fixes them), float."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise card.error("path", f"the ONNX model has {len(inputs)} inputs {names}; expected 1")
    shape, dtype = inputs[0].shape, inputs[0].type
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 1):
        raise card.error("path", f"the ONNX model's input has shape {shape}; expected (N, 1, H, W)")
    if dtype != "tensor(float)":
        raise card.error("path", f"the ONNX model's input is {dtype}; expected tensor(float)")


def load_onnx(card: ModelCard) -> OnnxCardModel:
    """The ``onnx`` kind: a session of the file at ``path`` (CUDA when it loads, else CPU)."""
    ort = require("onnxruntime", "onnx", "ONNX model cards (kind: onnx)")
    from qcloop.deploy.onnx.runtime import _quiet_ort, resolve_providers

    path = card.resolved_path
    if not path.is_file():
        raise card.error("path", f"{path} is not a file (kind onnx needs an .onnx file)")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        with _quiet_ort():
            session = ort.InferenceSession(str(path), options, providers=resolve_providers())
    except Exception as exc:
        first = " ".join(str(exc).split())[:400]
        raise card.error("path", f"{path}: ONNX Runtime cannot load it ({first})") from exc
    _check_signature(card, session)
    return OnnxCardModel(session)
