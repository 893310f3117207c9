"""The error of a Triton model repository."""

from __future__ import annotations

__all__ = ["TritonError"]


class TritonError(RuntimeError):
    """A Triton model repository cannot be written, or a configuration is invalid."""
