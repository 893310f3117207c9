"""Supervised training of a segmenter M that keeps the ``m_best`` best checkpoints.

Shuffled, seeded, augmented; ``L_sup = GD + CE`` with deep supervision; validation Dice per
case (the mean over LV, MYO and RV of the 3D stack) after every ``val_every`` epochs; the best
``m_best`` checkpoints become the candidate set. Resumable: ``training/last.pt`` is written
atomically after every epoch and holds everything needed to continue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcloop.monitor.core import atomic
from qcloop.monitor.core.progress import EpochBar
from qcloop.monitor.core.slices import SliceSet
from qcloop.monitor.method.augment import augment_batch
from qcloop.monitor.method.losses import SupervisedLoss

log = logging.getLogger(__name__)

MetricsLogger = Callable[[dict[str, float], int], None]


@dataclass
class ValCase:
    """A validation case on the network grid: image ``(Z, S, S)`` and labels ``(Z, S, S)``."""

    image: np.ndarray
    labels: np.ndarray


@dataclass
class TrainSettings:
    """What :func:`train_segmenter` needs from the configuration."""

    epochs: int = 30
    batch_size: int = 8
    m_best: int = 3
    val_every: int = 1
    flip: bool = True
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    max_slices_per_epoch: int | None = None
    lr: float | None = None
    seed: int = 0
    checkpoint_gap: int = 1


@dataclass
class Checkpoint:
    """One kept checkpoint: its file (relative to the model folder), epoch and validation Dice."""

    path: str
    epoch: int
    val_dice: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "epoch": self.epoch, "val_dice": self.val_dice}


@dataclass
class TrainResult:
    """The kept checkpoints, best first, and the per-epoch history."""

    checkpoints: list[Checkpoint]
    history: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module, image: np.ndarray, batch_size: int = 16
) -> np.ndarray:
    """Softmax probabilities ``(Z, C, S, S)`` of ``model`` (eval mode) for slices ``(Z, S, S)``;
    an empty stack (``Z = 0``) gives an empty map with the model's ``num_classes`` channels."""
    if len(image) == 0:
        classes = int(getattr(model, "num_classes", 4))
        return np.zeros((0, classes, *np.shape(image)[1:]), np.float32)
    was_training = model.training
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[:, None]
    device = next(model.parameters()).device  # a worker may have moved the model to a GPU
    out = [
        torch.softmax(model(x[i : i + batch_size].to(device)), dim=1).cpu()
        for i in range(0, len(x), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out).numpy()


def mean_foreground_dice(
    pred: np.ndarray, ref: np.ndarray, labels: Sequence[int] = (1, 2, 3)
) -> float:
    """Mean Dice over ``labels`` between two label maps (both empty counts as 1)."""
    from qcloop.monitor.method.segmentation_metrics import dice_score

    return float(np.mean([dice_score(pred == k, ref == k) for k in labels]))


def validate(model: torch.nn.Module, cases: Sequence[ValCase]) -> float:
    """Mean per-case foreground Dice on the network grid."""
    scores = [
        mean_foreground_dice(predict_probabilities(model, c.image).argmax(1), c.labels)
        for c in cases
    ]
    return float(np.mean(scores)) if scores else 0.0


def optimiser_step(optimiser: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One gradient step of ``optimiser`` on ``loss``; the loss value."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return float(loss.detach())


def _segmenter_weights(model: torch.nn.Module) -> list[float] | None:
    fn = getattr(model, "deep_supervision_weights", None)
    return list(fn()) if callable(fn) else None


@dataclass
class _Optimisation:
    """What one training run carries from epoch to epoch (and ``training/last.pt`` saves)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    kept: list[Checkpoint] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0

    def resume(self, model: torch.nn.Module, last_path: Path) -> None:
        """Continue from the state :meth:`save` wrote to ``last_path``."""
        state = torch.load(last_path, weights_only=True)
        model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.kept = [Checkpoint(**c) for c in state["kept"]]
        self.history = list(state["history"])
        self.start_epoch = int(state["epoch"]) + 1
        log.info("resuming training at epoch %d from %s", self.start_epoch, last_path)

    def save(self, model: torch.nn.Module, epoch: int, last_path: Path) -> None:
        """Write everything needed to continue after ``epoch`` to ``last_path`` (atomically)."""
        atomic.torch_save(
            {
                "model": model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "kept": [c.to_dict() for c in self.kept],
                "history": self.history,
                "epoch": epoch,
            },
            last_path,
        )


def train_segmenter(
    model: torch.nn.Module,
    train: SliceSet,
    val: Sequence[ValCase],
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    model_meta: dict[str, Any] | None = None,
    resume: bool = True,
    log_metrics: MetricsLogger | None = None,
) -> TrainResult:
    """Train ``model`` and keep the ``m_best`` best checkpoints by validation Dice in ``out_dir``.

    Args:
        model: a freshly built segmenter (see :class:`qcloop.monitor.core.interfaces.Segmenter`).
        train: training slices.
        val: validation cases (3D stacks on the network grid).
        settings: epochs, batch size, augmentation, seed, ...
        out_dir: model folder; ``candidates/`` and ``training/last.pt`` are written there.
        model_meta: stored in every checkpoint (segmenter name and params, view, ...).
        resume: continue from ``training/last.pt`` when it exists.
        log_metrics: optional ``log(metrics, step)`` callback (trackers).
    """
    out = Path(out_dir)
    (out / "candidates").mkdir(parents=True, exist_ok=True)
    last_path = out / "training" / "last.pt"
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer, scheduler = model.make_optimizer(settings.epochs, lr=settings.lr)
    run = _Optimisation(optimizer, scheduler, generator)
    if resume and last_path.exists():
        run.resume(model, last_path)
    trainer = _EpochTrainer(model, train, settings, run)
    what = f"training {(model_meta or {}).get('view', 'segmenter')}"
    bar = EpochBar(what, settings.epochs, run.start_epoch, log)
    for epoch in range(run.start_epoch, settings.epochs):
        t0 = time.perf_counter()
        record = {"epoch": float(epoch), "train_loss": trainer.train_epoch()}
        run.scheduler.step()
        dropped: list[Checkpoint] = []
        if (epoch + 1) % settings.val_every == 0 or epoch == settings.epochs - 1:
            record["val_dice"] = score = validate(model, val)
            # with a checkpoint gap, a larger pool is kept and spread out at the end
            pool = settings.m_best * settings.checkpoint_gap
            run.kept, dropped = _keep_best(model, run.kept, score, epoch, out, pool, model_meta)
        record["seconds"] = time.perf_counter() - t0
        run.history.append(record)
        bar.update(_shown(record))
        run.save(model, epoch, last_path)
        # only now that last.pt no longer names them may dropped checkpoints go
        for stale in dropped:
            (out / stale.path).unlink(missing_ok=True)
        if log_metrics is not None:
            log_metrics({k: v for k, v in record.items() if k != "epoch"}, epoch)
    bar.close()
    chosen = spread_candidates(run.kept, settings.m_best, settings.checkpoint_gap)
    for stale in run.kept:
        if stale not in chosen:
            (out / stale.path).unlink(missing_ok=True)
    return TrainResult(checkpoints=chosen, history=run.history)


class _EpochTrainer:
    """One pass over shuffled, augmented training slices with ``L_sup`` and deep supervision."""

    def __init__(
        self,
        model: torch.nn.Module,
        train: SliceSet,
        settings: TrainSettings,
        run: _Optimisation,
    ) -> None:
        self.model = model
        self.settings = settings
        self.run = run
        self.loss_fn = SupervisedLoss(num_classes=getattr(model, "num_classes", 4))
        self.ds_weights = _segmenter_weights(model)
        self.images = torch.from_numpy(train.images)
        self.labels = torch.from_numpy(train.labels.astype(np.int64))
        self.n = len(train)
        self.per_epoch = min(self.n, settings.max_slices_per_epoch or self.n)

    def train_epoch(self) -> float:
        """Train one epoch; return the mean batch loss (0 when no batch ran)."""
        s, run = self.settings, self.run
        self.model.train()
        order = torch.randperm(self.n, generator=run.generator)[: self.per_epoch]
        losses = []
        for i in range(0, self.per_epoch, s.batch_size):
            idx = order[i : i + s.batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            x, y = augment_batch(
                self.images[idx],
                self.labels[idx],
                run.generator,
                flip=s.flip,
                rotation_deg=s.rotation_deg,
                scale=s.scale,
            )
            loss = self.loss_fn(self.model(x), y, self.ds_weights)
            losses.append(optimiser_step(run.optimizer, loss))
        return float(np.mean(losses)) if losses else 0.0


def _shown(record: dict[str, float]) -> dict[str, float]:
    """What an epoch's progress shows: its loss, validation Dice (when validated), seconds."""
    shown = {"loss": record["train_loss"]}
    if "val_dice" in record:
        shown["val Dice"] = record["val_dice"]
    shown["s"] = record["seconds"]
    return shown


def _keep_best(
    model: torch.nn.Module,
    kept: list[Checkpoint],
    score: float,
    epoch: int,
    out: Path,
    keep: int,
    meta: dict[str, Any] | None,
) -> tuple[list[Checkpoint], list[Checkpoint]]:
    """Save this epoch's weights if they rank among the ``keep`` best.

    Returns the kept checkpoints (best first) and those that fell out (to delete).
    """
    ranked = sorted(kept, key=lambda c: -c.val_dice)
    if len(ranked) >= keep and score <= ranked[-1].val_dice:
        return ranked, []
    rel = f"candidates/epoch-{epoch:04d}.pt"
    atomic.torch_save(
        {"state_dict": model.state_dict(), "epoch": epoch, "val_dice": score, "meta": meta or {}},
        out / rel,
    )
    ranked.append(Checkpoint(path=rel, epoch=epoch, val_dice=score))
    ranked.sort(key=lambda c: -c.val_dice)
    return ranked[:keep], ranked[keep:]


def spread_candidates(pool: list[Checkpoint], m_best: int, gap: int) -> list[Checkpoint]:
    """The ``m_best`` best checkpoints of ``pool`` that are at least ``gap`` epochs apart
    (greedy by validation Dice; ``gap`` 1 gives the plain m_best best)."""
    chosen: list[Checkpoint] = []
    for c in sorted(pool, key=lambda c: -c.val_dice):
        if all(abs(c.epoch - k.epoch) >= gap for k in chosen):
            chosen.append(c)
        if len(chosen) == m_best:
            break
    return chosen
