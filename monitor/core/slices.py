"""The arrays a refiner works on: labelled training slices and the flagged (OoD) cases.

Both are core types, so a refiner plugin needs nothing but ``qcloop.monitor`` to read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["FlaggedSet", "SliceSet"]


@dataclass
class SliceSet:
    """2D training slices in network layout: images ``(N, 1, S, S)``, labels ``(N, S, S)``."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.ndim != 3 or len(self.images) != len(self.labels):
            raise ValueError(
                f"SliceSet needs images (N,1,S,S) and labels (N,S,S); got {self.images.shape} "
                f"and {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_stacks(cls, images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> SliceSet:
        """Concatenate per-case stacks ``(Z, S, S)`` into one slice set."""
        return cls(
            images=np.concatenate([i[:, None] for i in images]).astype(np.float32, copy=False),
            labels=np.concatenate(list(labels)).astype(np.uint8, copy=False),
        )


@dataclass
class FlaggedSet:
    """The unlabelled cases flagged as OoD, on the network grid.

    Attributes:
        images: per case, slices ``(Z, S, S)``.
        selected: per case, the QC-selected softmax map ``(Z, C, S, S)``.
    """

    images: list[np.ndarray]
    selected: list[np.ndarray] | None = None

    def slices(self) -> np.ndarray:
        """All slices ``(N, 1, S, S)``."""
        return np.concatenate(self.images)[:, None].astype(np.float32, copy=False)

    def case_sizes(self) -> list[int]:
        """Slices per case, in order (to cut :meth:`slices` back into cases)."""
        return [len(image) for image in self.images]

    def __len__(self) -> int:
        return len(self.images)
