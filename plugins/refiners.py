"""Built-in refiners: ``alpha`` (the paper) and ``blend`` (the authors' public code).

A refiner fine-tunes ONE candidate segmenter in place on the cases flagged as OoD, anchored by
the labelled training data; the core calls it once per candidate (on a copy) and saves the
refined set beside the original. It never sees ground truth of the flagged cases, and gives
``qc.reconstruct`` one case's softmax maps at a time (the core may rotate each case to the
training pose around the QC module).

* ``alpha``: ``L = (1/k) WGD(yM, R(yM)) + L_sup`` at refinement epoch ``k``, at most ``k_semi``
  epochs, stopping as soon as none of the flagged cases is still OoD for this candidate.
* ``blend``: alternates a supervised epoch with one RV-weighted step per OoD case against the
  pseudo label ``argmax(t * p_best + (1 - t) * R(M(x)))``, ``t = epoch / total``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qcloop.monitor import hookimpl
from qcloop.monitor.core.hookspecs import Register
from qcloop.monitor.core.progress import EpochBar
from qcloop.monitor.core.slices import FlaggedSet, SliceSet

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qcloop.monitor.core.interfaces import CaseReconstructor, MetricsLogger, StillOod

log = logging.getLogger(__name__)


class AlphaRefiner:
    """The paper's semi-supervised refinement with ``alpha = 1/k``.

    Args:
        k_semi: maximum number of refinement epochs.
        class_weights: WGD emphasis per class (background, LV, MYO, RV); the RV weighs more.
        lr: Adam learning rate of the fine-tuning.
        batch_size: flagged slices per step (paired with as many labelled slices).
        max_slices_per_epoch: cap on flagged slices visited per epoch (None = all).
        seed: shuffling seed.
        skip_incomplete: leave out of an epoch's semi-supervised loss the flagged cases whose
            pseudo label misses a whole structure (see :func:`usable_pseudo_labels`).
    """

    def __init__(
        self,
        k_semi: int = 5,
        class_weights: Sequence[float] = (0.0, 1.0, 1.0, 2.0),
        lr: float = 1e-4,
        batch_size: int = 8,
        max_slices_per_epoch: int | None = None,
        seed: int = 0,
        skip_incomplete: bool = True,
    ) -> None:
        if k_semi < 0:
            raise ValueError(f"k_semi must be >= 0, got {k_semi}")
        self.k_semi = k_semi
        self.class_weights = tuple(float(w) for w in class_weights)
        self.lr = lr
        self.batch_size = batch_size
        self.max_slices_per_epoch = max_slices_per_epoch
        self.seed = seed
        self.skip_incomplete = skip_incomplete

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
        """Fine-tune ``model`` in place; return the history (epochs, losses, OoD counts)."""
        import torch

        history = _start_history("alpha", model, flagged, still_ood)
        if "stopped" in history:
            return history
        tuning = _Tuning.start(model, labeled, self.seed, self.lr, len(self.class_weights))
        x_u_all = torch.from_numpy(flagged.slices())
        case_sizes = [len(image) for image in flagged.images]
        history["stopped"] = "k_semi reached"
        bar = EpochBar("refining (alpha)", self.k_semi)  # the loop logs its own lines
        for k in range(1, self.k_semi + 1):
            alpha = 1.0 / k
            # pseudo labels R(M(x)) of every flagged slice, from the model as it starts the epoch
            pseudo_all = _pseudo_labels(model, qc, x_u_all, case_sizes, self.batch_size)
            usable, skipped = usable_pseudo_labels(pseudo_all, flagged, self.skip_incomplete)
            if len(usable) == 0:
                history["epochs"].append({"epoch": k, "alpha": alpha, "skipped_cases": skipped})
                history["stopped"] = "no usable pseudo label"
                log.warning(
                    "alpha refinement epoch %d: every flagged case's pseudo label misses a "
                    "structure; nothing to refine on",
                    k,
                )
                break
            losses = self._epoch(model, tuning, x_u_all, pseudo_all, usable, alpha)
            remaining = still_ood(model)
            record = {
                "epoch": k,
                "alpha": alpha,
                "loss": float(np.mean(losses)),
                "ood": remaining,
                "skipped_cases": skipped,
            }
            metrics = {"refine_loss": record["loss"], "refine_ood": float(remaining)}
            _close_epoch(history, record, log_metrics, metrics, k)
            bar.update({"loss": record["loss"], "still OoD": remaining})
            log.info(
                "alpha refinement epoch %d: loss %.4f, %d case(s) still OoD, %d case(s) left "
                "out (pseudo label misses a structure)",
                k,
                record["loss"],
                remaining,
                len(skipped),
            )
            if remaining == 0:
                history["stopped"] = "no OoD case left"
                break
        bar.close()
        model.eval()
        return history

    def _epoch(
        self,
        model: torch.nn.Module,
        tuning: _Tuning,
        x_u_all: torch.Tensor,
        pseudo_all: torch.Tensor,
        usable: torch.Tensor,
        alpha: float,
    ) -> list[float]:
        """One refinement epoch: shuffled batches of usable flagged slices, each paired with
        random labelled slices, on ``alpha * L_semi + L_sup``; the batch losses."""
        import torch

        from qcloop.monitor.method.losses import weighted_generalised_dice

        n_u = len(usable)
        gen = tuning.generator
        order = usable[torch.randperm(n_u, generator=gen)[: self.max_slices_per_epoch or n_u]]
        pseudo = pseudo_all[order]
        model.train()
        losses = []
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            target = pseudo[i : i + self.batch_size]
            lab = torch.randint(0, len(tuning.x_l), (max(len(idx), 2),), generator=gen)
            x = torch.cat([x_u_all[idx], tuning.x_l[lab]])
            outputs = model(x)
            outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
            nu = len(idx)
            probs_u = torch.softmax(outputs[0][:nu], dim=1)
            l_semi = weighted_generalised_dice(probs_u, target, self.class_weights)
            l_sup = tuning.sup([o[nu:] for o in outputs], tuning.y_l[lab], tuning.ds_weights)
            losses.append(tuning.step(alpha * l_semi + l_sup))
        return losses


class BlendRefiner:
    """The authors' code: supervised epochs alternating with RV-weighted steps on OoD cases.

    Args:
        epochs: number of (supervised epoch, OoD steps) rounds.
        lr: Adam learning rate.
        batch_size: labelled slices per supervised step.
        rv_label: label of the structure the OoD loss is restricted to (RV = 3).
        max_slices_per_epoch: cap on labelled slices per supervised epoch (None = all).
        seed: shuffling seed.
        skip_incomplete: skip the OoD step of a case whose pseudo label misses a whole
            structure (see :func:`usable_pseudo_labels`); ``False`` is the authors' code.
    """

    def __init__(
        self,
        epochs: int = 5,
        lr: float = 1e-4,
        batch_size: int = 8,
        rv_label: int = 3,
        max_slices_per_epoch: int | None = None,
        seed: int = 0,
        skip_incomplete: bool = True,
    ) -> None:
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.rv_label = rv_label
        self.max_slices_per_epoch = max_slices_per_epoch
        self.seed = seed
        self.skip_incomplete = skip_incomplete

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
        """Fine-tune ``model`` in place; return the history."""
        import torch

        history = _start_history("blend", model, flagged, still_ood)
        if "stopped" in history:
            return history
        if flagged.selected is None:
            raise ValueError("blend refiner needs the QC-selected maps of the flagged cases")
        tuning = _Tuning.start(model, labeled, self.seed, self.lr, num_classes=4)
        cases = [torch.from_numpy(im[:, None].astype(np.float32)) for im in flagged.images]
        p_best = [torch.from_numpy(p.astype(np.float32)) for p in flagged.selected]
        bar = EpochBar("refining (blend)", self.epochs, logger=log)
        for epoch in range(self.epochs):
            t = epoch / self.epochs
            sup_losses = self._supervised_epoch(model, tuning)
            ood_losses, skipped = self._ood_steps(model, qc, tuning, cases, p_best, t)
            remaining = still_ood(model)
            record = {
                "epoch": epoch + 1,
                "t": t,
                "sup_loss": float(np.mean(sup_losses)) if sup_losses else 0.0,
                "ood_loss": float(np.mean(ood_losses)) if ood_losses else 0.0,
                "ood": remaining,
                "skipped_cases": sorted(skipped),
            }
            metrics = {"refine_ood_loss": record["ood_loss"], "refine_ood": float(remaining)}
            _close_epoch(history, record, log_metrics, metrics, epoch)
            bar.update({"loss": record["ood_loss"], "still OoD": remaining})
        bar.close()
        history["stopped"] = "epochs done"
        model.eval()
        return history

    def _supervised_epoch(self, model: torch.nn.Module, tuning: _Tuning) -> list[float]:
        """One shuffled supervised epoch on the labelled slices; the batch losses."""
        import torch

        model.train()
        n_l = len(tuning.x_l)
        order = torch.randperm(n_l, generator=tuning.generator)[: self.max_slices_per_epoch or n_l]
        losses = []
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            if len(idx) < 2:
                continue
            loss = tuning.sup(model(tuning.x_l[idx]), tuning.y_l[idx], tuning.ds_weights)
            losses.append(tuning.step(loss))
        return losses

    def _ood_steps(
        self,
        model: torch.nn.Module,
        qc: CaseReconstructor,
        tuning: _Tuning,
        cases: Sequence[torch.Tensor],
        p_best: Sequence[torch.Tensor],
        t: float,
    ) -> tuple[list[float], list[int]]:
        """One RV-weighted step per flagged case (shuffled) against the pseudo label
        ``argmax(t * p_best + (1 - t) * R(M(x)))``; the step losses and the skipped cases."""
        import torch

        from qcloop.monitor.method.assessment import missing_structures

        losses = []
        skipped = []
        for c in torch.randperm(len(cases), generator=tuning.generator).tolist():
            with torch.no_grad():
                model.eval()
                probs = torch.softmax(model(cases[c]), 1).numpy()
                recon = torch.from_numpy(qc.reconstruct(probs, image=cases[c][:, 0].numpy()))
                target = (t * p_best[c] + (1 - t) * recon).argmax(1)
            if self.skip_incomplete and missing_structures(target.numpy()):
                skipped.append(c)
                continue
            model.train()  # BatchNorm statistics adapt on OoD cases, as in the authors' code
            out = model(cases[c])
            logits = out[0] if isinstance(out, list | tuple) else out
            losses.append(tuning.step(_rv_loss(logits, target, self.rv_label)))
        return losses, skipped


def _rv_loss(logits: torch.Tensor, target: torch.Tensor, rv_label: int) -> torch.Tensor:
    """Soft Dice plus binary cross-entropy of the RV-versus-rest logit against the pseudo
    label's RV mask."""
    import torch
    import torch.nn.functional as F

    rv_logit = logits[:, rv_label] - torch.logsumexp(
        torch.cat([logits[:, :rv_label], logits[:, rv_label + 1 :]], 1), 1
    )
    rv_target = (target == rv_label).float()
    prob = torch.sigmoid(rv_logit)
    dice = 1 - (2 * (prob * rv_target).sum() + 1e-5) / (prob.sum() + rv_target.sum() + 1e-5)
    return dice + F.binary_cross_entropy_with_logits(rv_logit, rv_target)


@dataclass
class _Tuning:
    """What both refiners fine-tune with: a seeded shuffling generator, Adam, the supervised
    loss with the model's deep-supervision weights, and the labelled slices as tensors."""

    generator: torch.Generator
    optimiser: torch.optim.Optimizer
    sup: torch.nn.Module
    ds_weights: list[float]
    x_l: torch.Tensor
    y_l: torch.Tensor

    @classmethod
    def start(
        cls, model: torch.nn.Module, labeled: SliceSet, seed: int, lr: float, num_classes: int
    ) -> _Tuning:
        """Seed the generator and torch's global RNG with ``seed``; Adam at ``lr`` on ``model``."""
        import torch

        from qcloop.monitor.method.losses import SupervisedLoss

        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        return cls(
            generator=generator,
            optimiser=torch.optim.Adam(model.parameters(), lr=lr),
            sup=SupervisedLoss(num_classes=num_classes),
            ds_weights=list(model.deep_supervision_weights()),
            x_l=torch.from_numpy(labeled.images),
            y_l=torch.from_numpy(labeled.labels.astype(np.int64)),
        )

    def step(self, loss: torch.Tensor) -> float:
        """One optimiser step on ``loss``; its value."""
        from qcloop.monitor.method.segmenter_training import optimiser_step

        return optimiser_step(self.optimiser, loss)


def _close_epoch(
    history: dict[str, Any],
    record: dict[str, Any],
    log_metrics: MetricsLogger | None,
    metrics: dict[str, float],
    step: int,
) -> None:
    """Append an epoch's ``record`` to the history and pass ``metrics`` to the tracker."""
    history["epochs"].append(record)
    if log_metrics is not None:
        log_metrics(metrics, step)


def _start_history(
    name: str, model: torch.nn.Module, flagged: FlaggedSet, still_ood: StillOod
) -> dict[str, Any]:
    """A refiner's history with the OoD count before refinement; marked ``stopped`` when
    there is nothing to refine."""
    history: dict[str, Any] = {"refiner": name, "epochs": [], "ood_before": still_ood(model)}
    if len(flagged) == 0 or history["ood_before"] == 0:
        history["stopped"] = "no OoD case"
    return history


def usable_pseudo_labels(
    pseudo: torch.Tensor, flagged: FlaggedSet, skip_incomplete: bool = True
) -> tuple[torch.Tensor, list[int]]:
    """Indices of the flagged slices whose case has a usable pseudo label, and the skipped cases.

    A pseudo label (per case, the stack of ``pseudo`` slices, ``(N, C, S, S)`` over all flagged
    slices in case order) that misses a whole structure is no plausible heart: it is what the QC
    module reconstructs when the prediction it was given is far off (a misplaced blob comes back
    as no RV at all). Training towards it teaches the segmenter to drop the structure, turning a
    poor segmentation into a missing one, so such cases are left out of this epoch's
    semi-supervised loss (they stay flagged, and the supervised term still anchors the model).
    """
    import torch

    from qcloop.monitor.method.assessment import missing_structures

    labels = pseudo.argmax(1).numpy()
    keep: list[torch.Tensor] = []
    skipped: list[int] = []
    start = 0
    for case, image in enumerate(flagged.images):
        stop = start + len(image)
        if skip_incomplete and missing_structures(labels[start:stop]):
            skipped.append(case)
        else:
            keep.append(torch.arange(start, stop))
        start = stop
    usable = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
    return usable, skipped


def _pseudo_labels(
    model: torch.nn.Module,
    qc: CaseReconstructor,
    x: torch.Tensor,
    case_sizes: Sequence[int],
    batch_size: int,
) -> torch.Tensor:
    """``R(M(x))`` of the flagged slices ``x`` (cases of ``case_sizes`` slices, in order), no
    gradient. M runs on batches across cases; R sees one case at a time, as in assessment."""
    import torch

    model.eval()
    step = max(batch_size, 16)
    with torch.no_grad():
        probs = torch.cat(
            [torch.softmax(model(x[i : i + step]), 1) for i in range(0, len(x), step)]
        )
    cases = zip(torch.split(probs, list(case_sizes)), torch.split(x, list(case_sizes)), strict=True)
    return torch.cat(
        [torch.from_numpy(qc.reconstruct(p.numpy(), image=im[:, 0].numpy())) for p, im in cases]
    )


@hookimpl
def register_refiners(register: Register) -> None:
    """Register ``alpha`` and ``blend``."""
    register("alpha", AlphaRefiner)
    register("blend", BlendRefiner)
