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
    if val_masks is not None:
        monitor, monitor_name = val_masks, "val"
    else:
        pick = np.random.default_rng(seed).permutation(len(masks))[:MONITOR_SUBSET]
        monitor, monitor_name = masks[np.sort(pick)], "train"
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
            try:
                _run_attempt(
                    net,
                    masks,
                    monitor,
                    cfg,
                    attempt=attempt,
                    seed=attempt_seed,
                    balanced=balanced,
                    generalised_dice=generalised_dice,
                    history=history,
                    log=log,
                )
            except _Restart:
                continue
        net.eval()
        losses = [e["loss"] for e in history["epochs"] if e["attempt"] == attempt]
        final = history["epochs"][-1]
        history.update(
            attempts=attempt + 1,
            seed=attempt_seed,
            balanced_loss=final["balanced"],
            loss=losses,
            dice=final["dice"],
            seconds=time.perf_counter() - started,
        )
        logger.info(
            "autoencoder trained in %.1f s (%d attempt(s)); %s Dice %s",
            history["seconds"],
            attempt + 1,
            monitor_name,
            {k: round(v, 3) for k, v in final["dice"].items()},
        )
        return net, history
    last = history["collapse_events"][-1]
    raise CollapseError(
        f"QC autoencoder still collapsed after {cfg.max_restarts} restart(s): classes "
        f"{last['classes']} (Dice {last['dice']}) at attempt {last['attempt']}, epoch "
        f"{last['epoch']}; see the collapse events: {history['collapse_events']}",
        history,
    )


def _run_attempt(
    net: nn.Module,
    masks: np.ndarray,
    monitor: np.ndarray,
    cfg: TrainingConfig,
    *,
    attempt: int,
    seed: int,
    balanced: bool,
    generalised_dice: nn.Module,
    history: dict[str, Any],
    log: Log | None,
) -> None:
    """Train one attempt for ``cfg.epochs`` epochs; raise ``_Restart`` (after recording the event)
    when collapse handling asks for a restart, :class:`CollapseError` when none is left."""
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = len(masks)
    streak_start: int | None = None

    def escalate(epoch: int, agreement: Agreement | None, reason: str) -> None:
        restart = attempt < cfg.max_restarts
        event = {
            "attempt": attempt,
            "epoch": epoch,
            "reason": reason,
            "classes": agreement.collapsed if agreement else [],
            "dice": agreement.dice if agreement else {},
            "action": "restart" if restart else "give_up",
        }
        history["collapse_events"].append(event)
        logger.warning("autoencoder collapse (%s) at epoch %d: %s", reason, epoch, event["action"])
        if not restart:
            raise CollapseError(
                f"QC autoencoder collapsed ({reason}) at attempt {attempt}, epoch {epoch} and no "
                f"restart is left (max_restarts={cfg.max_restarts}): classes {event['classes']}, "
                f"Dice {event['dice']}",
                history,
            )
        raise _Restart

    # warm-up and patience are counted in epochs, with a floor in optimisation steps so that a
    # small mask set (one long-axis slice per case) is not judged after a handful of steps
    steps_per_epoch = max(1, -(-n // cfg.batch_size))
    warmup = max(cfg.collapse_warmup, -(-cfg.collapse_warmup_steps // steps_per_epoch))
    patience = max(cfg.collapse_patience, -(-cfg.collapse_patience_steps // steps_per_epoch))
    for epoch in progress(range(1, cfg.epochs + 1), desc=f"QC autoencoder (attempt {attempt})"):
        net.train()
        sums: dict[str, float] = {}
        order = torch.randperm(n, generator=generator).numpy()
        for start in range(0, n, cfg.batch_size):
            idx = np.sort(order[start : start + cfg.batch_size])
            labels = torch.from_numpy(masks[idx])
            if cfg.augments:
                labels = augment_masks(
                    labels,
                    generator,
                    flip=cfg.augment_flip,
                    rotation_deg=cfg.augment_rotation_deg,
                    scale=cfg.augment_scale,
                )
            labels = labels.to(cfg.device)
            target = one_hot(labels, cfg.num_classes)
            loss, terms = reconstruction_loss(net(target), target, generalised_dice, balanced)
            if not torch.isfinite(loss):
                escalate(epoch, None, "non-finite loss")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            weight = len(idx) / n
            sums["loss"] = sums.get("loss", 0.0) + loss.item() * weight
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.item() * weight
        agreement = measure_agreement(net, monitor, cfg)
        history["epochs"].append(
            {
                "attempt": attempt,
                "epoch": epoch,
                "balanced": balanced,
                **sums,
                "dice": agreement.dice,
                "fraction_ratio": agreement.fraction_ratio,
            }
        )
        if log is not None:
            metrics = {f"qc/{k}": v for k, v in sums.items()}
            metrics.update({f"qc/dice_{k}": v for k, v in agreement.dice.items()})
            metrics["qc/attempt"] = float(attempt)
            log(metrics, len(history["epochs"]))
        if not agreement.collapsed:
            streak_start = None
            continue
        last_epoch = epoch == cfg.epochs
        if epoch < warmup and not last_epoch:
            continue
        if streak_start is None:
            streak_start = epoch
            if not balanced and not last_epoch:
                balanced = True
                history["collapse_events"].append(
                    {
                        "attempt": attempt,
                        "epoch": epoch,
                        "reason": "collapsed classes",
                        "classes": agreement.collapsed,
                        "dice": agreement.dice,
                        "action": "balanced_loss",
                    }
                )
                logger.warning(
                    "autoencoder collapse at epoch %d (%s): switching to the balanced loss",
                    epoch,
                    agreement.collapsed,
                )
                continue
        if epoch - streak_start >= patience or last_epoch:
            escalate(epoch, agreement, "collapsed classes")
