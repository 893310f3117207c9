"""The parity check: an exported model run by ONNX Runtime (CPU) against PyTorch.

Outputs must agree as ``numpy.allclose`` judges (``|onnx - torch| <= atol + rtol * |torch|``,
so the allowance grows with the output's scale: large logits carry float32 rounding of their
size), a segmenter's softmax probabilities to ``atol``, and the argmax on at least
``min_argmax_agreement`` of the pixels. The QC module is checked the same way on its
reconstructed probabilities, fed with the segmenters' softmax maps. ``qcloop export-onnx
--parity-atol/--parity-rtol`` change the tolerances.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcloop.deploy.onnx.errors import ExportError, ParityError

__all__ = [
    "MAX_ABS_DIFF",
    "MIN_ARGMAX_AGREEMENT",
    "PARITY_BATCH",
    "ParityTolerance",
    "check_parity",
    "parity_figures",
    "parity_line",
]

#: Default absolute tolerance on any output (and on a segmenter's probabilities).
MAX_ABS_DIFF: float = 1e-4
#: Smallest accepted fraction of pixels whose argmax agrees.
MIN_ARGMAX_AGREEMENT: float = 0.9999
#: Slices per ONNX Runtime call during the parity check (the last batch is usually partial, so
#: the dynamic batch axis is exercised too).
PARITY_BATCH = 16


@dataclass(frozen=True)
class ParityTolerance:
    """How closely ONNX Runtime must reproduce PyTorch."""

    atol: float = MAX_ABS_DIFF
    rtol: float = 1e-4
    min_argmax_agreement: float = MIN_ARGMAX_AGREEMENT

    def __post_init__(self) -> None:
        if self.atol < 0 or self.rtol < 0 or not 0 < self.min_argmax_agreement <= 1:
            raise ValueError(f"invalid parity tolerance {self}")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def parity_figures(
    reference: np.ndarray,
    candidate: np.ndarray,
    tolerance: ParityTolerance | None = None,
    *,
    logits: bool = False,
) -> dict[str, Any]:
    """Max |difference|, its excess over the allowance ``atol + rtol * |reference|`` (<= 0:
    within), argmax agreement (class axis 1) and, for ``logits``, the max |difference| of the
    softmax probabilities, of two ``(N, C, H, W)`` arrays."""
    tol = tolerance or ParityTolerance()
    if reference.shape != candidate.shape:
        raise ExportError(f"shape mismatch: PyTorch {reference.shape} vs ONNX {candidate.shape}")
    if not np.all(np.isfinite(candidate)):
        return {"max_abs_diff": float("inf"), "max_excess": float("inf"), "argmax_agreement": 0.0}
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    diff = np.abs(ref - cand)
    figures: dict[str, Any] = {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "max_excess": float((diff - tol.atol - tol.rtol * np.abs(ref)).max()) if diff.size else 0.0,
        "argmax_agreement": float(np.mean(reference.argmax(1) == candidate.argmax(1))),
    }
    if logits and diff.size:
        figures["max_prob_diff"] = float(np.abs(_softmax(ref) - _softmax(cand)).max())
    return figures


def _batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """``fn`` applied to ``x`` in batches of :data:`PARITY_BATCH`, concatenated."""
    return np.concatenate([fn(x[i : i + PARITY_BATCH]) for i in range(0, len(x), PARITY_BATCH)])


def check_parity(
    label: str,
    proto_bytes: bytes,
    reference: Callable[[np.ndarray], np.ndarray],
    inputs: np.ndarray,
    tolerance: ParityTolerance | None = None,
    *,
    logits: bool = False,
) -> tuple[dict[str, Any], np.ndarray]:
    """Run the serialised model in ONNX Runtime (CPU) on ``inputs`` and compare with
    ``reference`` (``logits``: the outputs are logits, whose probabilities are compared too);
    return the figures and PyTorch's outputs.

    Raises:
        ParityError: the figures are outside the tolerances.
    """
    import onnxruntime as ort

    tol = tolerance or ParityTolerance()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto_bytes, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = _batched(lambda batch: session.run(None, {name: batch})[0], inputs)
    want = _batched(reference, inputs)
    figures: dict[str, Any] = {
        **parity_figures(want, got, tol, logits=logits),
        "slices": len(inputs),
        "batch": PARITY_BATCH,
        "tolerance": {"atol": tol.atol, "rtol": tol.rtol, "agreement": tol.min_argmax_agreement},
    }
    probs_ok = figures.get("max_prob_diff", 0.0) <= tol.atol
    close = figures["max_excess"] <= 0 and probs_ok
    if not (close and figures["argmax_agreement"] >= tol.min_argmax_agreement):
        prob = f", probabilities max |diff| {figures['max_prob_diff']:.3g}" if logits else ""
        raise ParityError(
            f"{label}: ONNX Runtime disagrees with PyTorch: max |diff| "
            f"{figures['max_abs_diff']:.3g} (allowed {tol.atol:g} + {tol.rtol:g} x |output|, "
            f"exceeded by {max(figures['max_excess'], 0):.3g}){prob}, argmax agreement "
            f"{100 * figures['argmax_agreement']:.4f} % (limit "
            f"{100 * tol.min_argmax_agreement:g} %) on {figures['slices']} slices; nothing was "
            "written (qcloop export-onnx --parity-atol/--parity-rtol set the tolerances)",
            {**figures, "model": label},
        )
    figures["passed"] = True
    return figures, want


def parity_line(label: str, figures: dict[str, Any]) -> str:
    """The progress line of a model that passed."""
    return (
        f"{label}: parity ok: max |diff| {figures['max_abs_diff']:.2e}, argmax agreement "
        f"{100 * figures['argmax_agreement']:.4f} % on {figures['slices']} slices"
    )
