"""The parity check: an exported model run by ONNX Runtime (CPU) against PyTorch.

Segmenters must agree to :data:`MAX_ABS_DIFF` on logits and :data:`MIN_ARGMAX_AGREEMENT` on the
argmax; the QC module the same on its reconstructed probabilities, fed with the segmenters'
softmax maps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from qcloop.deploy.onnx.errors import ExportError, ParityError

__all__ = [
    "MAX_ABS_DIFF",
    "MIN_ARGMAX_AGREEMENT",
    "PARITY_BATCH",
    "check_parity",
    "parity_figures",
    "parity_line",
]

#: Largest accepted |PyTorch - ONNX Runtime| on any logit / reconstructed probability.
MAX_ABS_DIFF: float = 1e-4
#: Smallest accepted fraction of pixels whose argmax agrees.
MIN_ARGMAX_AGREEMENT: float = 0.9999
#: Slices per ONNX Runtime call during the parity check (the last batch is usually partial, so
#: the dynamic batch axis is exercised too).
PARITY_BATCH = 16


def parity_figures(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max |difference| and argmax agreement (over the class axis 1) of two ``(N, C, H, W)``
    arrays."""
    if reference.shape != candidate.shape:
        raise ExportError(f"shape mismatch: PyTorch {reference.shape} vs ONNX {candidate.shape}")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    if not np.all(np.isfinite(candidate)):
        return {"max_abs_diff": float("inf"), "argmax_agreement": 0.0}
    agree = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    return {"max_abs_diff": float(diff.max()) if diff.size else 0.0, "argmax_agreement": agree}


def _batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """``fn`` applied to ``x`` in batches of :data:`PARITY_BATCH`, concatenated."""
    return np.concatenate([fn(x[i : i + PARITY_BATCH]) for i in range(0, len(x), PARITY_BATCH)])


def check_parity(
    label: str,
    proto_bytes: bytes,
    reference: Callable[[np.ndarray], np.ndarray],
    inputs: np.ndarray,
) -> tuple[dict[str, Any], np.ndarray]:
    """Run the serialised model in ONNX Runtime (CPU) on ``inputs`` and compare with
    ``reference``; return the figures and PyTorch's outputs.

    Raises:
        ParityError: the figures are outside the tolerances.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto_bytes, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = _batched(lambda batch: session.run(None, {name: batch})[0], inputs)
    want = _batched(reference, inputs)
    figures: dict[str, Any] = {
        **parity_figures(want, got),
        "slices": len(inputs),
        "batch": PARITY_BATCH,
    }
    tol_diff, tol_agree = MAX_ABS_DIFF, MIN_ARGMAX_AGREEMENT
    if not (figures["max_abs_diff"] <= tol_diff and figures["argmax_agreement"] >= tol_agree):
        raise ParityError(
            f"{label}: ONNX Runtime disagrees with PyTorch: max |diff| "
            f"{figures['max_abs_diff']:.3g} (limit {tol_diff:g}), argmax agreement "
            f"{100 * figures['argmax_agreement']:.4f} % (limit {100 * tol_agree:g} %) on "
            f"{figures['slices']} slices; nothing was written",
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
