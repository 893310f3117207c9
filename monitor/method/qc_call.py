"""How the core calls a QC module's ``reconstruct``: with the case's prepared image for a module
that reads it (``needs_image = True``, an image-aware QC module), with the maps alone for a
mask-only one (the paper's autoencoder, and every module written before the image contract,
which need not know that images exist)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["QcImageError", "call_reconstruct", "needs_image"]


class QcImageError(ValueError):
    """An image-aware QC module called without the image it reads."""


def needs_image(component: Any) -> bool:
    """Whether a QC module (or a runtime holding one) reads the prepared image beside the maps."""
    return bool(getattr(component, "needs_image", False))


def call_reconstruct(
    component: Any, probabilities: np.ndarray, image: np.ndarray | None = None
) -> np.ndarray:
    """``component.reconstruct`` of one case's maps ``(Z, C, S, S)``; ``image``: the same case's
    prepared slices ``(Z, S, S)``, passed on only to a module that reads it."""
    if not needs_image(component):
        return component.reconstruct(probabilities)
    if image is None:
        raise QcImageError(
            f"the QC module {type(component).__name__} reads the image beside the masks, and "
            "this caller has no image to give it"
        )
    return component.reconstruct(probabilities, image=image)
