"""Refinement of a model qcloop did not train, given by a trainable model card (``kind: torch``:
an ``nn.Module`` class and its weights), on its own grid and in its own label order.

The configured refiner (``alpha``, ``blend``, or a plugin's such as TENT) fine-tunes the card's
module where the card's model lives: the flagged cases and the labelled anchor slices are
prepared exactly as the card says (spacing, crop/pad, normalisation), and the module is wrapped
in :class:`CardSegmenter`, whose logits come in qcloop's label order (0 bg, 1 LV, 2 MYO, 3 RV),
so the refiners' losses and the ground truth need no translation.

The QC module lives on the QC run's grid. A refiner hands its reconstructor one case's maps at
a time without saying which case, so :class:`CardGridQC` takes the card's grid onto the QC grid
and back by one case-blind centred resampling (both preparations centre their window on the
resampled image). Back on the card's grid a map is unchanged (the round trip through the case's
own transforms loses more), and on the QC grid it sits within a pixel of where the case's own
transforms put it (the two windows' half-pixel rounding): a shift the QC module's training
positions cover (``tests/test_refine_card.py`` measures both). Counting the cases still OoD
goes the exact way, through each case's own transforms, as assessment does.

The refined module is saved as weights beside a new card (``RUN/<VIEW>/model/``), so the
refined run is a calibrated run like its parent: assessed, monitored, served, registered and
refined again the same way.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from qcloop.monitor.core import atomic
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.resolve import build_refiner
from qcloop.monitor.core.serialise import jsonable
from qcloop.monitor.core.slices import FlaggedSet, SliceSet
from qcloop.monitor.method.assess import Assessed, make_assessor
from qcloop.monitor.method.calibrate import CARD_FILE, file_sha256
from qcloop.monitor.method.cases import (
    Labelled,
    labelled_sources,
    load_prepared,
    make_preprocessor,
)
from qcloop.monitor.method.external import CardPredictor
from qcloop.monitor.method.qc_call import needs_image
from qcloop.monitor.method.quality_estimate import load_estimator
from qcloop.monitor.method.refine import assess_window, count_still_ood
from qcloop.monitor.method.run_folder import RunError, load_model_set

log = logging.getLogger(__name__)

__all__ = [
    "CardGridQC",
    "CardSegmenter",
    "card_refinement_problem",
    "refine_card_view",
    "resample_centred",
]

#: The refined weights' file name inside ``RUN/<VIEW>/model/``.
WEIGHTS_FILE = "weights.pt"
#: Floor of a probability before its logarithm (``activation: none`` models).
_EPS = 1e-7


class CardSegmenter(torch.nn.Module):
    """A card's ``nn.Module`` as qcloop's refiners see a segmenter: one channel in, logits of
    qcloop's four labels out (model classes sharing a label, such as extra classes on
    background, are merged by ``logsumexp``, i.e. their probabilities add up).

    ``activation: none`` models (probabilities out) give the logarithm of their probabilities,
    whose softmax is the probabilities again. ``module`` is the wrapped module itself (not a
    copy): what the refiner changes is what :meth:`state_dict_of_module` saves.
    """

    num_classes = 4
    in_channels = 1

    def __init__(self, module: torch.nn.Module, index: np.ndarray, activation: str, divisor: int):
        super().__init__()
        if activation not in ("softmax", "none"):
            raise ValueError(f"a model with activation {activation!r} cannot be trained here")
        self.module = module
        self.activation = activation
        self.divisor = int(divisor)
        groups = [[int(c) for c in np.flatnonzero(index == label)] for label in range(4)]
        if any(not g for g in groups):
            raise ValueError(f"model classes {index.tolist()} do not cover qcloop's four labels")
        self._groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """qcloop-order logits ``(N, 4, H, W)`` of slices ``(N, 1, H, W)`` (a list output, deep
        supervision, gives its first element)."""
        out = self.module(x)
        if isinstance(out, list | tuple):
            out = out[0]
        if self.activation == "none":
            out = torch.log(out.clamp_min(_EPS))
        return torch.stack([torch.logsumexp(out[:, g], dim=1) for g in self._groups], dim=1)

    def deep_supervision_weights(self) -> list[float]:
        """One output, weight 1."""
        return [1.0]

    def describe(self) -> dict[str, Any]:
        """The wrapped class and its parameter count."""
        n = sum(p.numel() for p in self.module.parameters())
        return {"architecture": type(self.module).__name__, "parameters": int(n)}

    def make_optimizer(
        self, total_epochs: int, lr: float | None = None
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Adam at ``lr`` (default 1e-4) with a constant schedule (refiners bring their own)."""
        opt = torch.optim.Adam(self.module.parameters(), lr=lr or 1e-4)
        return opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


def resample_centred(
    probs: np.ndarray, src_spacing: float, dst_size: int, dst_spacing: float
) -> np.ndarray:
    """Probability maps ``(Z, C, S, S)`` on a square grid of ``src_spacing`` mm, resampled
    (bilinear, ``torch.nn.functional.grid_sample``) onto a ``dst_size`` square grid of
    ``dst_spacing`` mm sharing its centre; beyond the source, background (class 0) is 1."""
    z, _, s, _ = probs.shape
    scale = (dst_spacing / src_spacing) * (dst_size - 1) / max(s - 1, 1)
    axis = torch.linspace(-1.0, 1.0, dst_size, dtype=torch.float32) * scale
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).expand(z, dst_size, dst_size, 2)
    src = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))
    out = torch.nn.functional.grid_sample(
        src, grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    out[:, 0] += (1.0 - out.sum(dim=1)).clamp_min(0.0)
    return out.numpy()


@dataclass(frozen=True)
class CardGridQC:
    """The QC module's reconstruction of one case's maps on the card's grid: onto the QC grid,
    reconstructed there (in the reference pose when pose normalisation is on), and back."""

    reconstruct_qc: Callable[[np.ndarray], np.ndarray]
    card_spacing: float
    card_size: int
    qc_spacing: float
    qc_size: int

    def reconstruct(self, probabilities: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """Reconstruction ``(Z, C, S, S)`` on the card's grid of maps on the card's grid.
        ``image`` is not used: a card is refined with a mask-only QC module."""
        on_qc = resample_centred(probabilities, self.card_spacing, self.qc_size, self.qc_spacing)
        recon = self.reconstruct_qc(on_qc)
        return resample_centred(recon, self.qc_spacing, self.card_size, self.card_spacing)


def card_refinement_problem(predictor: CardPredictor) -> str | None:
    """Why this card's model cannot be refined here, or ``None`` when it can."""
    card = predictor.card
    if not predictor.trainable or predictor.model.module is None:
        return (
            f"its {card.kind} model is not trainable here (onnx, torchscript and nnunet files "
            "hold no training graph); give a torch card (module + weights) or fine-tune it "
            "where it was trained, on the flagged cases that qcloop assess lists"
        )
    if card.output.activation == "labels":
        return "its model outputs labels (output.activation: labels); there is no gradient"
    if card.input.spacing_mm is None or card.input.size is None:
        return (
            "refinement needs the card's fixed grid (input.spacing_mm and input.size), to "
            "batch slices of different cases and to meet the QC module's grid"
        )
    return None


def refine_card_view(
    view: str,
    run: Path,
    out: Path,
    cfg: QcloopConfig,
    data_dir: str | Path,
    labelled_dir: Labelled,
    where: dict[str, Any] | None = None,
    assessed: tuple[int, list[Assessed]] | None = None,
) -> dict[str, Any]:
    """Refine one view's card model on its flagged cases; write the refined weights and card
    under ``out/view/model`` and its ``candidates.json``. ``assessed`` as in
    :func:`qcloop.monitor.method.refine.refine_view`."""
    model_set = load_model_set(run, view, cfg)
    predictor = model_set.candidates[0]
    if not isinstance(predictor, CardPredictor):
        raise RunError(f"{run}/{view}: its candidate is not a model card")
    problem = card_refinement_problem(predictor)
    if problem is None and needs_image(model_set.qc):
        problem = (
            "its QC module reads the image, and a card's slices are prepared as the card says, "
            "not as the QC module was trained; refine it with a mask-only QC module"
        )
    if problem:
        raise RunError(f"{run}: cannot refine {view}: {problem}")
    qc_pre = make_preprocessor(cfg)
    estimator = load_estimator(run, view, cfg.assessment)
    n_cases, flagged_items = assessed or assess_window(
        model_set, cfg, data_dir, qc_pre, where, estimator
    )
    card_cases = [
        predictor.preprocessor.prepare_image(a.item.case.image, a.item.case.spacing)
        for a in flagged_items
    ]
    flagged = FlaggedSet(
        images=[slices for slices, _ in card_cases],
        selected=[predictor.slice_probabilities(slices) for slices, _ in card_cases],
    )
    labelled = _labelled_slices(labelled_dir, view, predictor, cfg)
    assessor = make_assessor(model_set, cfg)
    grid_qc = CardGridQC(
        assessor.reconstruct,
        float(predictor.card.input.spacing_mm),
        int(predictor.card.input.size),
        float(qc_pre.target_spacing or predictor.card.input.spacing_mm),
        int(qc_pre.size or predictor.card.input.size),
    )
    segmenter = _segmenter(predictor)
    fences = [a.scored.fences for a in flagged_items]

    def still_ood(model: torch.nn.Module) -> int:
        def on_qc_grid(i: int) -> np.ndarray:
            return _qc_grid_probabilities(model, card_cases[i], flagged_items[i])

        return count_still_ood(assessor, on_qc_grid, flagged_items, fences)

    refiner = build_refiner(cfg, seed=cfg.seed)
    history = refiner.refine(segmenter, grid_qc, flagged, labelled, still_ood)
    entry = save_refined_card(out / view, predictor, segmenter, view)
    log.info("%s: refined the card model on %d flagged of %d cases", view, len(flagged), n_cases)
    return {
        "cases": n_cases,
        "flagged": len(flagged_items),
        "refiner": cfg.refinement.refiner.name,
        "flagged_keys": [f"{a.item.case.key}" for a in flagged_items],
        "history": jsonable([history]),
        "model": {"file": f"{view}/model/{WEIGHTS_FILE}", "sha256": entry["sha256"]},
    }


def _segmenter(predictor: CardPredictor) -> CardSegmenter:
    """A trainable copy of the card's module, wrapped for the refiners."""
    card = predictor.card
    module = copy.deepcopy(predictor.model.module)
    return CardSegmenter(module, card.qcloop_index(), card.output.activation, card.input.divisor)


def _labelled_slices(
    labelled_dir: str | Path, view: str, predictor: CardPredictor, cfg: QcloopConfig
) -> SliceSet:
    """The training split of the labelled cases, prepared as the card says (labels in qcloop's
    order)."""
    train_src = labelled_sources(labelled_dir, view, cfg.seed)
    cases = [
        c for c in load_prepared(train_src, predictor.preprocessor) if c.prepared.gt is not None
    ]
    if not cases:
        raise RunError(
            f"{labelled_dir}: no labelled {view} case to anchor the refinement (give --labelled)"
        )
    return SliceSet.from_stacks([c.prepared.image for c in cases], [c.prepared.gt for c in cases])


def _qc_grid_probabilities(
    model: torch.nn.Module, card_case: tuple[np.ndarray, Any], item: Assessed
) -> np.ndarray:
    """One flagged case's probabilities from ``model`` on the QC grid, the exact way: card
    grid -> the case's original grid -> the QC grid, through the case's own transforms."""
    from qcloop.monitor.method.segmenter_training import predict_probabilities

    slices, card_transform = card_case
    on_card = predict_probabilities(model, slices)
    original = card_transform.restore_probabilities(on_card)
    return item.item.prepared.transform.apply_probabilities(original)


def save_refined_card(
    view_dir: Path, predictor: CardPredictor, segmenter: CardSegmenter, view: str
) -> dict[str, Any]:
    """Write the refined weights and a card naming them into ``view_dir/model``, and
    ``view_dir/candidates.json``; the candidate entry."""
    model_dir = view_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    atomic.torch_save(segmenter.module.state_dict(), model_dir / WEIGHTS_FILE)
    card = {**predictor.card.to_dict(), "path": WEIGHTS_FILE, "views": [view]}
    atomic.write_text(model_dir / CARD_FILE, yaml.safe_dump(card, sort_keys=False))
    entry = {
        "card": f"model/{CARD_FILE}",
        "sha256": file_sha256(model_dir / WEIGHTS_FILE),
        "epoch": -1,
        "parent_card": str(predictor.card.card_path),
    }
    atomic.write_json(view_dir / "candidates.json", [entry])
    return entry


def refined_card_info(views: dict[str, dict[str, Any]], parent: dict[str, Any]) -> dict[str, Any]:
    """What a refined card run's ``run.json`` keeps of its parent's: the card (its kind and
    grid), the QC run; the refined files are per view."""
    keep = ("card", "qc_run", "where")
    return {
        **{k: parent[k] for k in keep if k in parent},
        "models": {view: result["model"] for view, result in views.items() if "model" in result},
    }
