"""Training of the mask autoencoder: the reconstruction loss, collapse detection and the escape
ladder (balanced loss, then restarts with new seeds), with a per-epoch history."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qcloop.monitor import LABELS
from qcloop.monitor.core.progress import progress
from qcloop.monitor.method.augment import augment_masks

logger = logging.getLogger(__name__)

#: Seed offset between restarts: attempt ``a`` trains with ``seed + a * RESTART_SEED_STRIDE``.
RESTART_SEED_STRIDE = 7919
#: Training masks used to watch for collapse when no validation masks are given.
MONITOR_SUBSET = 128
#: Logit margin of the deliberately collapsed start: softmax saturates at background.
_COLLAPSED_LOGIT = 15.0

Log = Callable[[dict[str, float], int], Any]


class CollapseError(RuntimeError):
    """The autoencoder ended collapsed (all background or a dropped class) after every restart.

    ``history`` holds the training history up to the failure (epochs and collapse events).
    """

    def __init__(self, message: str, history: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.history: dict[str, Any] = history or {}


@dataclass(frozen=True)
class TrainingConfig:
    """Optimiser, schedule and collapse-handling settings of one ``fit``."""

    num_classes: int
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    device: str
    balanced_loss: bool
    collapse_warmup: int
    collapse_patience: int
    collapse_warmup_steps: int
    collapse_patience_steps: int
    collapse_dice: float
    collapse_fraction: float
    max_restarts: int
    augment_flip: bool = False
    augment_rotation_deg: float = 0.0
    augment_scale: tuple[float, float] = (1.0, 1.0)

    @property
    def augments(self) -> bool:
        """Whether training masks are randomly flipped, rotated or scaled."""
        return self.augment_flip or self.augment_rotation_deg > 0 or self.augment_scale != (1, 1)


def class_names(num_classes: int) -> dict[int, str]:
    """Names of the foreground classes ``1..num_classes-1`` (qcloop's names where they exist)."""
    if num_classes == len(LABELS):
        return {c: LABELS[c] for c in range(1, num_classes)}
    return {c: f"class{c}" for c in range(1, num_classes)}


def one_hot(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot float tensor ``(N, C, H, W)`` of integer label masks ``(N, H, W)``."""
    return F.one_hot(masks.long(), num_classes).permute(0, 3, 1, 2).float().contiguous()


def reconstruction_loss(
    probabilities: torch.Tensor,
    target: torch.Tensor,
    generalised_dice: nn.Module,
    balanced: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_R = MSE + generalised Dice; with ``balanced`` also a background/foreground-balanced
    squared error and a class-averaged soft Dice. Returns the total and its named terms."""
    terms = {
        "mse": F.mse_loss(probabilities, target),
        "gd": generalised_dice(probabilities, target),
    }
    if balanced:
        squared = ((probabilities - target) ** 2).sum(dim=1)
        foreground = 1.0 - target[:, 0]
        background = target[:, 0]
        fg_error = (squared * foreground).sum() / foreground.sum().clamp_min(1.0)
        bg_error = (squared * background).sum() / background.sum().clamp_min(1.0)
        terms["balanced_mse"] = 0.5 * (fg_error + bg_error)
        dims = (0, 2, 3)
        intersection = (probabilities * target).sum(dims)
        sizes = probabilities.sum(dims) + target.sum(dims)
        dice = (2.0 * intersection + 1e-5) / (sizes + 1e-5)
        terms["class_dice"] = 1.0 - dice.mean()
    total = torch.stack(list(terms.values())).sum()
    return total, terms


@dataclass
class Agreement:
    """Per-class agreement of argmax reconstructions with their targets over a monitor set."""

    dice: dict[str, float]
    fraction_ratio: dict[str, float]
    collapsed: list[str]


@torch.no_grad()
def measure_agreement(
    net: nn.Module,
    masks: np.ndarray,
    cfg: TrainingConfig,
) -> Agreement:
    """Reconstruct ``masks`` in eval mode and compare per class: Dice of the argmax, predicted
    over true foreground fraction, and the classes that count as collapsed."""
    was_training = net.training
    net.eval()
    c = cfg.num_classes
    inter = torch.zeros(c, dtype=torch.float64)
    pred = torch.zeros(c, dtype=torch.float64)
    true = torch.zeros(c, dtype=torch.float64)
    step = max(cfg.batch_size, 64)
    for start in range(0, len(masks), step):
        labels = torch.from_numpy(masks[start : start + step]).long().to(cfg.device)
        recon = net(one_hot(labels, c)).argmax(dim=1)
        for k in range(c):
            p, t = recon == k, labels == k
            inter[k] += (p & t).sum().item()
            pred[k] += p.sum().item()
            true[k] += t.sum().item()
    net.train(was_training)
    dice: dict[str, float] = {}
    ratio: dict[str, float] = {}
    collapsed: list[str] = []
    for k, name in class_names(c).items():
        denom = pred[k] + true[k]
        dice[name] = float(2.0 * inter[k] / denom) if denom > 0 else 1.0
        if true[k] > 0:
            ratio[name] = float(pred[k] / true[k])
            if dice[name] < cfg.collapse_dice or ratio[name] < cfg.collapse_fraction:
                collapsed.append(name)
    return Agreement(dice=dice, fraction_ratio=ratio, collapsed=collapsed)


def saturate_to_background(net: nn.Module) -> None:
    """Put ``net`` in a collapsed state: its last layer outputs background with saturated softmax.

    Used to provoke the collapse deliberately (tests, diagnostics): gradients through the
    saturated softmax vanish, so no loss can pull this state back; only a restart escapes it.
    """
    head = net.head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-_COLLAPSED_LOGIT)
        head.bias[0] = _COLLAPSED_LOGIT


def _rng_devices(device: str) -> list[int]:
    dev = torch.device(device)
    return [dev.index or 0] if dev.type == "cuda" else []


class _Restart(Exception):
    """Internal signal: abandon this attempt and start the next one."""


def train_autoencoder(
    build_net: Callable[[], nn.Module],
    masks: np.ndarray,
    val_masks: np.ndarray | None,
    cfg: TrainingConfig,
    *,
    seed: int,
    log: Log | None = None,
    start_collapsed: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a fresh network from ``build_net`` on label masks and return it with its history.

    Collapse is checked after every epoch from ``cfg.collapse_warmup`` on. The first collapse of
    an attempt switches on the balanced loss; a collapse lasting ``cfg.collapse_patience``
    epochs, a non-finite loss, or a collapsed final epoch restarts from a new seed with the
    balanced loss, up to ``cfg.max_restarts`` times; after that :class:`CollapseError` is raised.
    ``start_collapsed`` saturates the first attempt's output at background (to provoke collapse).
    """
    from monai.losses import GeneralizedDiceLoss

    generalised_dice = GeneralizedDiceLoss(include_background=True, softmax=False, w_type="square")
    monitor, monitor_name = _monitor_masks(masks, val_masks, seed)
    history: dict[str, Any] = {
        "monitor": monitor_name,
        "epochs": [],
        "collapse_events": [],
    }
    started = time.perf_counter()
    for attempt in range(cfg.max_restarts + 1):
        attempt_seed = seed + attempt * RESTART_SEED_STRIDE
        balanced = cfg.balanced_loss or attempt > 0
        with torch.random.fork_rng(devices=_rng_devices(cfg.device)):
            torch.manual_seed(attempt_seed)
            net = build_net().to(cfg.device)
            if start_collapsed and attempt == 0:
                saturate_to_background(net)
            run = _Attempt(net, cfg, attempt, attempt_seed, balanced, generalised_dice, history)
            try:
                run.train(masks, monitor, log)
            except _Restart:
                continue
        net.eval()
        _summarise(history, attempt, attempt_seed, time.perf_counter() - started)
        return net, history
    last = history["collapse_events"][-1]
    raise CollapseError(
        f"QC autoencoder still collapsed after {cfg.max_restarts} restart(s): classes "
        f"{last['classes']} (Dice {last['dice']}) at attempt {last['attempt']}, epoch "
        f"{last['epoch']}; see the collapse events: {history['collapse_events']}",
        history,
    )


def _monitor_masks(
    masks: np.ndarray, val_masks: np.ndarray | None, seed: int
) -> tuple[np.ndarray, str]:
    """The masks collapse is watched on, and their name: the validation masks when given, else
    a fixed subset of the training masks."""
    if val_masks is not None:
        return val_masks, "val"
    pick = np.random.default_rng(seed).permutation(len(masks))[:MONITOR_SUBSET]
    return masks[np.sort(pick)], "train"


def _summarise(history: dict[str, Any], attempt: int, seed: int, seconds: float) -> None:
    """Add the successful attempt's summary (attempts, seed, losses, final Dice) to ``history``."""
    losses = [e["loss"] for e in history["epochs"] if e["attempt"] == attempt]
    final = history["epochs"][-1]
    history.update(
        attempts=attempt + 1,
        seed=seed,
        balanced_loss=final["balanced"],
        loss=losses,
        dice=final["dice"],
        seconds=seconds,
    )
    logger.info(
        "autoencoder trained in %.1f s (%d attempt(s)); %s Dice %s",
        seconds,
        attempt + 1,
        history["monitor"],
        {k: round(v, 3) for k, v in final["dice"].items()},
    )


class _Attempt:
    """One training attempt: the epoch loop, its history entries and the collapse policy.

    :meth:`train` raises ``_Restart`` (after recording the event) when collapse handling asks
    for a restart, :class:`CollapseError` when none is left.
    """

    def __init__(
        self,
        net: nn.Module,
        cfg: TrainingConfig,
        attempt: int,
        seed: int,
        balanced: bool,
        generalised_dice: nn.Module,
        history: dict[str, Any],
    ) -> None:
        self.net = net
        self.cfg = cfg
        self.attempt = attempt
        self.balanced = balanced
        self.generalised_dice = generalised_dice
        self.history = history
        self.optimiser = torch.optim.Adam(
            net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.streak_start: int | None = None

    def train(self, masks: np.ndarray, monitor: np.ndarray, log: Log | None) -> None:
        """Train for ``cfg.epochs`` epochs, checking collapse on ``monitor`` after each."""
        cfg = self.cfg
        # warm-up and patience are counted in epochs, with a floor in optimisation steps so that
        # a small mask set (one long-axis slice per case) is not judged after a handful of steps
        steps_per_epoch = max(1, -(-len(masks) // cfg.batch_size))
        warmup = max(cfg.collapse_warmup, -(-cfg.collapse_warmup_steps // steps_per_epoch))
        patience = max(cfg.collapse_patience, -(-cfg.collapse_patience_steps // steps_per_epoch))
        epochs = range(1, cfg.epochs + 1)
        for epoch in progress(epochs, desc=f"QC autoencoder (attempt {self.attempt})"):
            sums = self._train_epoch(masks, epoch)
            agreement = measure_agreement(self.net, monitor, cfg)
            self._record(epoch, sums, agreement, log)
            self._check_collapse(epoch, agreement, warmup, patience)

    def _train_epoch(self, masks: np.ndarray, epoch: int) -> dict[str, float]:
        """One shuffled pass over ``masks``; the loss and its terms, weighted by batch size."""
        cfg, n = self.cfg, len(masks)
        self.net.train()
        sums: dict[str, float] = {}
        order = torch.randperm(n, generator=self.generator).numpy()
        for start in range(0, n, cfg.batch_size):
            idx = np.sort(order[start : start + cfg.batch_size])
            labels = torch.from_numpy(masks[idx])
            if cfg.augments:
                labels = augment_masks(
                    labels,
                    self.generator,
                    flip=cfg.augment_flip,
                    rotation_deg=cfg.augment_rotation_deg,
                    scale=cfg.augment_scale,
                )
            target = one_hot(labels.to(cfg.device), cfg.num_classes)
            loss, terms = reconstruction_loss(
                self.net(target), target, self.generalised_dice, self.balanced
            )
            if not torch.isfinite(loss):
                self._escalate(epoch, None, "non-finite loss")
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()
            weight = len(idx) / n
            sums["loss"] = sums.get("loss", 0.0) + loss.item() * weight
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.item() * weight
        return sums

    def _record(
        self, epoch: int, sums: dict[str, float], agreement: Agreement, log: Log | None
    ) -> None:
        """Append the epoch to the history and pass its figures to ``log`` (``qc/...``)."""
        self.history["epochs"].append(
            {
                "attempt": self.attempt,
                "epoch": epoch,
                "balanced": self.balanced,
                **sums,
                "dice": agreement.dice,
                "fraction_ratio": agreement.fraction_ratio,
            }
        )
        if log is not None:
            metrics = {f"qc/{k}": v for k, v in sums.items()}
            metrics.update({f"qc/dice_{k}": v for k, v in agreement.dice.items()})
            metrics["qc/attempt"] = float(self.attempt)
            log(metrics, len(self.history["epochs"]))

    def _check_collapse(self, epoch: int, agreement: Agreement, warmup: int, patience: int) -> None:
        """The escape ladder: the first collapse (after the warm-up) switches on the balanced
        loss; one lasting ``patience`` epochs, or in the final epoch, escalates."""
        if not agreement.collapsed:
            self.streak_start = None
            return
        last_epoch = epoch == self.cfg.epochs
        if epoch < warmup and not last_epoch:
            return
        if self.streak_start is None:
            self.streak_start = epoch
            if not self.balanced and not last_epoch:
                self.balanced = True
                self._event(epoch, agreement, "collapsed classes", "balanced_loss")
                logger.warning(
                    "autoencoder collapse at epoch %d (%s): switching to the balanced loss",
                    epoch,
                    agreement.collapsed,
                )
                return
        if epoch - self.streak_start >= patience or last_epoch:
            self._escalate(epoch, agreement, "collapsed classes")

    def _event(
        self, epoch: int, agreement: Agreement | None, reason: str, action: str
    ) -> dict[str, Any]:
        """Record a collapse event in the history and return it."""
        event = {
            "attempt": self.attempt,
            "epoch": epoch,
            "reason": reason,
            "classes": agreement.collapsed if agreement else [],
            "dice": agreement.dice if agreement else {},
            "action": action,
        }
        self.history["collapse_events"].append(event)
        return event

    def _escalate(self, epoch: int, agreement: Agreement | None, reason: str) -> None:
        """Restart from a new seed, or give up when no restart is left."""
        restart = self.attempt < self.cfg.max_restarts
        event = self._event(epoch, agreement, reason, "restart" if restart else "give_up")
        logger.warning("autoencoder collapse (%s) at epoch %d: %s", reason, epoch, event["action"])
        if not restart:
            raise CollapseError(
                f"QC autoencoder collapsed ({reason}) at attempt {self.attempt}, epoch {epoch} "
                f"and no restart is left (max_restarts={self.cfg.max_restarts}): classes "
                f"{event['classes']}, Dice {event['dice']}",
                self.history,
            )
        raise _Restart
