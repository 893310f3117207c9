"""The ``tent`` refiner: fully test-time adaptation by entropy minimisation.

Wang, Shelhamer, Liu, Olshausen and Darrell, "Tent: fully test-time adaptation by entropy
minimization", ICLR 2021. On the slices of the cases the QC module flagged as out of
distribution, TENT minimises the mean softmax entropy of the segmenter's own predictions,

    H(x) = - (1 / |pixels|) * sum_pixels sum_c p_c(x) log p_c(x),

and updates nothing but the affine parameters (scale and shift) of the normalisation layers;
every other weight stays frozen. The normalisation layers run in training mode while adapting,
so they normalise with the flagged batches' statistics, as in TENT; their running statistics
are re-estimated on those batches, so the refined model, served in eval mode, normalises the
flagged distribution the way it was adapted. Neither the QC module nor the labelled slices are
used: TENT needs no label, real or pseudo.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from qcloop.monitor import CaseReconstructor, FlaggedSet, SliceSet

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from qcloop.monitor.core.interfaces import MetricsLogger, StillOod

__all__ = ["TentRefiner", "adaptable_parameters", "mean_entropy", "normalisation_layers"]

log = logging.getLogger(__name__)

_OPTIMIZERS = ("adam", "sgd")


def _norm_kinds() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(batch-normalisation classes, the other normalisation classes) of torch."""
    from torch import nn

    batch = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    other = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    return batch, other


def normalisation_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The normalisation layers of ``model`` that carry affine parameters (batch, group,
    layer and instance normalisation)."""
    batch, other = _norm_kinds()
    return [
        m
        for m in model.modules()
        if isinstance(m, batch + other) and any(p is not None for p in (m.weight, m.bias))
    ]


def adaptable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters TENT updates: the weight and bias of every normalisation layer."""
    return [
        p
        for layer in normalisation_layers(model)
        for p in (layer.weight, layer.bias)
        if p is not None
    ]


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The mean over samples and pixels of the softmax entropy (nats) of ``logits``
    ``(N, C, ...)``."""
    import torch

    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full-resolution logits, whether the model returns one map or a deep-supervision list."""
    out = model(x)
    return out[0] if isinstance(out, list | tuple) else out


class TentRefiner:
    """TENT on the flagged cases' slices (the ``tent`` refiner).

    Args:
        epochs: passes over the flagged slices (fewer when no flagged case is left OoD).
        lr: learning rate of the optimiser.
        optimizer: ``"adam"`` (TENT's choice for small batches) or ``"sgd"`` (with momentum).
        momentum: SGD momentum (ignored by Adam).
        batch_size: flagged slices per step.
        max_slices_per_epoch: cap on the slices visited per epoch (None: all of them).
        reset_statistics: re-estimate the batch-normalisation running statistics on the
            flagged slices (their average over the adaptation's batches), so the refined model
            normalises with target statistics in eval mode as TENT does while adapting;
            ``False`` lets them drift towards the target at the layers' own momentum.
        seed: seed of the slice order.
    """

    name = "tent"

    def __init__(
        self,
        epochs: int = 3,
        lr: float = 1e-3,
        optimizer: str = "adam",
        momentum: float = 0.9,
        batch_size: int = 16,
        max_slices_per_epoch: int | None = None,
        reset_statistics: bool = True,
        seed: int = 0,
    ) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"tent refiner: epochs must be an integer >= 0, got {epochs!r}")
        if not lr > 0:
            raise ValueError(f"tent refiner: lr must be > 0, got {lr!r}")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(
                f"tent refiner: optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}"
            )
        if batch_size < 1:
            raise ValueError(f"tent refiner: batch_size must be >= 1, got {batch_size!r}")
        if max_slices_per_epoch is not None and max_slices_per_epoch < 1:
            raise ValueError(
                "tent refiner: max_slices_per_epoch must be >= 1 or null, got "
                f"{max_slices_per_epoch!r}"
            )
        self.epochs = epochs
        self.lr = float(lr)
        self.optimizer = optimizer
        self.momentum = float(momentum)
        self.batch_size = batch_size
        self.max_slices_per_epoch = max_slices_per_epoch
        self.reset_statistics = bool(reset_statistics)
        self.seed = seed

    def refine(
        self,
        model: torch.nn.Module,
        qc: CaseReconstructor,
        flagged: FlaggedSet,
        labeled: SliceSet,
        still_ood: StillOod,
        *,
        log_metrics: MetricsLogger | None = None,
    ) -> dict[str, Any]:
        """Adapt ``model``'s normalisation parameters in place on ``flagged``; return the
        history: per epoch the mean entropy while adapting (``loss``) and the cases still OoD
        (``ood``); the eval-mode mean entropy of the flagged slices before and after; why it
        stopped. ``qc`` and ``labeled`` are not used. The model is left in eval mode."""
        import torch

        history: dict[str, Any] = {
            "refiner": self.name,
            "epochs": [],
            "ood_before": still_ood(model),
        }
        if len(flagged) == 0 or history["ood_before"] == 0:
            history["stopped"] = "no OoD case"
            model.eval()
            return history
        params = adaptable_parameters(model)
        if not params:
            raise ValueError(
                f"tent refiner: {type(model).__name__} has no normalisation layer with affine "
                "parameters to adapt"
            )
        x = torch.from_numpy(flagged.slices())
        history["entropy_before"] = self._eval_entropy(model, x)
        gen = torch.Generator().manual_seed(self.seed)
        opt = self._optimizer(params)
        history["stopped"] = "epochs done"
        reset = self.reset_statistics and self.epochs > 0
        with _only_trainable(model, params), _target_statistics(model, reset):
            for epoch in range(1, self.epochs + 1):
                losses = [self._step(model, opt, batch) for batch in self._batches(x, gen)]
                remaining = still_ood(model)
                record = {"epoch": epoch, "loss": sum(losses) / len(losses), "ood": remaining}
                history["epochs"].append(record)
                if log_metrics is not None:
                    log_metrics(
                        {"refine_loss": record["loss"], "refine_ood": float(remaining)}, epoch
                    )
                log.info(
                    "tent epoch %d: mean entropy %.4f, %d case(s) still OoD",
                    epoch,
                    record["loss"],
                    remaining,
                )
                if remaining == 0:
                    history["stopped"] = "no OoD case left"
                    break
        history["entropy_after"] = self._eval_entropy(model, x)
        model.eval()
        return history

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The configured optimiser over ``params`` only."""
        import torch

        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        return torch.optim.Adam(params, lr=self.lr)

    def _batches(self, x: torch.Tensor, gen: torch.Generator) -> Iterator[torch.Tensor]:
        """One epoch's batches of flagged slices, in a seeded order; a last batch of one slice
        is left out when there are others (batch statistics need two)."""
        import torch

        order = torch.randperm(len(x), generator=gen)[: self.max_slices_per_epoch or len(x)]
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            if len(idx) > 1 or len(order) == 1:
                yield x[idx]

    @staticmethod
    def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> float:
        """One entropy-minimisation step with the normalisation layers in training mode."""
        model.eval()  # dropout and the rest stay in inference mode ...
        for layer in normalisation_layers(model):
            layer.train()  # ... normalisation uses (and tracks) the batch statistics
        loss = mean_entropy(_logits(model, batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def _eval_entropy(self, model: torch.nn.Module, x: torch.Tensor) -> float:
        """Mean entropy of the model's eval-mode predictions on ``x`` (what it would serve)."""
        import torch

        model.eval()
        total = 0.0
        with torch.no_grad():
            for batch in torch.split(x, self.batch_size):
                total += float(mean_entropy(_logits(model, batch))) * len(batch)
        return total / len(x)


@contextlib.contextmanager
def _target_statistics(model: torch.nn.Module, reset: bool) -> Iterator[None]:
    """With ``reset``, batch-normalisation layers forget their running statistics and average
    those of every batch in the block (momentum ``None``); their momentum is restored after."""
    batch, _ = _norm_kinds()
    layers = [m for m in model.modules() if isinstance(m, batch) and m.track_running_stats]
    saved = [(m, m.momentum) for m in layers] if reset else []
    for m, _ in saved:
        m.reset_running_stats()
        m.momentum = None
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


@contextlib.contextmanager
def _only_trainable(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Within the block only ``params`` require gradients; every flag is restored after."""
    keep = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
