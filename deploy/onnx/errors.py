"""Errors of an ONNX export."""

from __future__ import annotations

from typing import Any

__all__ = ["ExportError", "ParityError"]


class ExportError(RuntimeError):
    """The run cannot be exported (missing files, unusable data, a failed conversion), or an
    export cannot be read back."""


class ParityError(ExportError):
    """An exported model disagrees with PyTorch beyond the tolerances; ``figures`` says by how
    much."""

    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures
