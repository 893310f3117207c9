"""Interfaces of the component kinds that plugins provide (small ``typing.Protocol`` classes).

The core resolves a component by name from the configuration once (through the plugin
registry), then calls it as a plain object: nothing below is dispatched through pluggy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch


@runtime_checkable
class Segmenter(Protocol):
    """A 2D segmentation network (``torch.nn.Module``): 1 channel in, ``num_classes`` logits out.

    In training mode with deep supervision it returns a list of logit maps (full resolution first);
    in eval mode exactly one tensor ``(N, num_classes, H, W)``. ``H`` and ``W`` must be multiples of
    ``divisor``.
    """

    num_classes: int
    in_channels: int
    divisor: int

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]: ...

    def deep_supervision_weights(self) -> list[float]:
        """Loss weight of each output returned in training mode (sums to 1)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Architecture name, widths, depth and parameter count (for logs and model metadata)."""
        ...

    def make_optimizer(
        self, total_epochs: int, lr: float | None = None
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The architecture's reference optimiser and per-epoch learning-rate schedule."""
        ...


@runtime_checkable
class QCModule(Protocol):
    """A quality-control model that reconstructs plausible masks from predicted ones."""

    input_size: int
    num_classes: int

    def fit(
        self,
        masks: np.ndarray,
        val_masks: np.ndarray | None = None,
        *,
        seed: int = 0,
        log: Any = None,
    ) -> dict[str, Any]:
        """Train on label masks ``(N, H, W)`` (uint8, values 0..num_classes-1); return history."""
        ...

    def reconstruct(self, probabilities: np.ndarray) -> np.ndarray:
        """Reconstruct ``(N, C, H, W)`` softmax probabilities; returns ``(N, C, H, W)`` probabilities."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Fences(Protocol):
    """Fitted outlier fences: a case fails when ``pdc < pdc_low`` or ``phd > phd_high``."""

    pdc_low: float
    phd_high: float

    def is_outlier(self, pdc: float, phd: float) -> bool: ...

    def to_dict(self) -> dict[str, Any]: ...


class ThresholdStrategy(Protocol):
    """Fits fences on a population's quality estimates; keeps no state of its own."""

    def fit(
        self,
        pdc: Sequence[float],
        phd: Sequence[float],
        penalised: Sequence[bool] | None = None,
    ) -> Fences: ...


class CaseReconstructor(Protocol):
    """The QC module as a refiner sees it: the reconstruction of ONE case's softmax maps
    ``(Z, C, H, W)``, taken in the training pose when pose normalisation is on."""

    def reconstruct(self, probabilities: np.ndarray) -> np.ndarray: ...


class Refiner(Protocol):
    """Fine-tunes one candidate segmenter in place on the flagged (OoD) cases."""

    def refine(
        self,
        model: Any,
        qc: CaseReconstructor,
        flagged: Any,
        labeled: Any,
        still_ood: Callable[[Any], int],
        *,
        log_metrics: Callable[[dict[str, float], int], None] | None = None,
    ) -> dict[str, Any]:
        """Return the history (epochs, losses, OoD counts); ``still_ood(model)`` counts the
        flagged cases this candidate still leaves outside its fences."""
        ...


class Tracker(Protocol):
    """Experiment tracking: runs with params, metrics and artifacts, and model versions."""

    def start_run(
        self, name: str, tags: dict[str, str] | None = None
    ) -> AbstractContextManager[Any]: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
