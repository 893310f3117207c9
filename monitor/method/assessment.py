"""Assessment: every candidate predicts, the QC module reconstructs, pseudo-Dice (pDC) and
pseudo-Hausdorff (pHD) are computed per case (the 3D stack of a subject/view/phase) and
structure, fences decide the OoD flag, and QC-based selection picks the output.

Fences come from the configured population: ``reference`` (calibrated on validation cases at
training time, so each case is judged as it arrives) or ``transductive`` (fitted on the batch
being assessed, once it is wholly scored, as in the paper).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qcloop.monitor.data.case import Case
from qcloop.monitor.data.preprocess import PreprocessTransform
from qcloop.monitor.method.pose import PoseReference, reconstruct_posed
from qcloop.monitor.method.qc_signals import case_signals
from qcloop.monitor.method.segmentation_metrics import (
    StructureScores,
    compute_metrics,
    fov_diagonal_mm,
)
from qcloop.monitor.method.segmenter_training import predict_probabilities
from qcloop.monitor.method.selection import (
    Selection,
    apply_selection,
    best_values,
    is_ood,
    select_candidate,
)

log = logging.getLogger(__name__)

STRUCTURE_NAMES = ("LV", "MYO", "RV")


@dataclass
class ScoredCase:
    """QC scores of one case for every candidate (no pixel data)."""

    key: dict[str, Any]
    spacing: tuple[float, float, float]
    candidates: list[dict[str, StructureScores]]
    decision_structure: str
    fences: Any = None
    ood: bool | None = None
    selection: Selection | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, rec: dict[str, Any], key_fields: Sequence[str]) -> ScoredCase:
        """The unjudged scores of a scoring-only record (one with ``spacing``; ``key_fields``:
        the record's identity fields). JSON keeps floats exactly, so fences fitted on these
        equal fences fitted on the original."""
        candidates = [
            {
                s: StructureScores(
                    dice=v["pdc"], hd=v["phd_mm"], hd95=v["phd95_mm"], penalised=v["penalised"]
                )
                for s, v in c.items()
            }
            for c in rec["candidates"]
        ]
        key = {k: rec[k] for k in key_fields if k in rec}
        spacing = tuple(float(x) for x in rec["spacing"])
        return cls(key, spacing, candidates, rec["decision_structure"])  # type: ignore[arg-type]

    def decision(self) -> tuple[list[float], list[float], list[bool]]:
        """Per-candidate (pDC, pHD, penalised) of the decision structure."""
        values = [decision_value(c, self.decision_structure) for c in self.candidates]
        return [v[0] for v in values], [v[1] for v in values], [v[2] for v in values]

    def best(self) -> tuple[float, float, bool]:
        """The case's best pDC and best pHD over candidates (and whether both are penalties)."""
        pdc, phd, pen = self.decision()
        b_pdc, b_phd = best_values(pdc, phd)
        return b_pdc, b_phd, all(pen)

    def judge(self, fences: Any) -> None:
        """Apply ``fences``: set the OoD flag and the selection."""
        pdc, phd, _ = self.decision()
        self.fences = fences
        self.ood = bool(is_ood(pdc, phd, fences))
        self.selection = select_candidate(pdc, phd, fences.phd_high)

    def to_record(self) -> dict[str, Any]:
        """The JSON record of this case (one line of the JSONL stream)."""
        rec: dict[str, Any] = dict(self.key)
        rec["decision_structure"] = self.decision_structure
        rec["candidates"] = [
            {
                s: {"pdc": v.dice, "phd_mm": v.hd, "phd95_mm": v.hd95, "penalised": v.penalised}
                for s, v in c.items()
            }
            for c in self.candidates
        ]
        if self.fences is not None:
            rec["fences"] = self.fences.to_dict()
        rec["ood"] = self.ood
        if self.selection is not None:
            rec["selection"] = {
                "kind": self.selection.kind,
                "index": self.selection.index,
                "indices": list(self.selection.indices) if self.selection.indices else None,
                "reason": self.selection.reason,
            }
        rec.update(self.extra)
        return rec


def decision_value(scores: dict[str, StructureScores], structure: str) -> tuple[float, float, bool]:
    """(pDC, pHD, penalised) of one candidate for ``structure`` (or the mean over structures)."""
    if structure == "mean":
        vals = list(scores.values())
        return (
            float(np.mean([v.dice for v in vals])),
            float(np.mean([v.hd for v in vals])),
            any(v.penalised for v in vals),
        )
    v = scores[structure]
    return v.dice, v.hd, v.penalised


def pseudo_metrics(
    labels: np.ndarray,
    reconstruction: np.ndarray,
    spacing: Sequence[float],
    *,
    voxel_units: bool = False,
    structures: Sequence[str] = STRUCTURE_NAMES,
) -> dict[str, StructureScores]:
    """pDC/pHD per structure between a predicted label stack and its QC reconstruction.

    A structure missing from the whole predicted case is implausible for a cardiac SA or LA
    acquisition: it gets the penalty (pDC 0, pHD = field-of-view diagonal) even when the
    reconstruction is empty too, so an all-empty prediction is always flagged.
    """
    scores = compute_metrics(
        labels, reconstruction, spacing, voxel_units=voxel_units, structures=tuple(structures)
    )
    absent = set(missing_structures(labels, tuple(scores)))
    if not absent:
        return scores
    fov = fov_diagonal_mm(labels.shape, [1.0] * labels.ndim if voxel_units else spacing)
    missing = StructureScores(dice=0.0, hd=fov, hd95=fov, penalised=True)
    return {name: missing if name in absent else value for name, value in scores.items()}


def missing_structures(
    labels: np.ndarray, structures: Sequence[str] = STRUCTURE_NAMES
) -> list[str]:
    """The structures absent from a whole case's label stack (implausible for a cardiac SA or
    LA acquisition): the QC penalty, and the refiners' test of a usable pseudo label."""
    from qcloop.monitor import STRUCTURES

    return [name for name in structures if not np.any(labels == STRUCTURES[name])]


#: The case a prepared stack came from, and the transform that prepared it.
CaseOrigin = tuple[Case, PreprocessTransform]


def net_probabilities(
    candidate: Any, image: np.ndarray, batch_size: int = 16, origin: CaseOrigin | None = None
) -> np.ndarray:
    """Softmax maps ``(Z, C, S, S)`` of one candidate on the run's grid. A qcloop-trained
    network runs on the prepared ``image``; a model qcloop did not train (a model card, with
    ``net_probabilities(case, transform)``) runs on the original case as its card says, and its
    maps are brought onto the run's grid."""
    if hasattr(candidate, "net_probabilities"):
        if origin is None:
            raise ValueError("a model-card candidate needs the original case (origin) to run")
        return candidate.net_probabilities(*origin)
    return predict_probabilities(candidate, image, batch_size)


class Assessor:
    """Scores prepared cases with a model set (all candidates + QC module)."""

    def __init__(
        self,
        model_set: Any,
        *,
        decision_structure: str = "RV",
        voxel_units: bool = False,
        batch_size: int = 16,
        pose: PoseReference | None = None,
    ) -> None:
        self.model_set = model_set
        self.decision_structure = decision_structure
        self.voxel_units = voxel_units
        self.batch_size = batch_size
        self.pose = pose

    def reconstruct(self, probabilities: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """The QC module's reconstruction of one case's maps ``(Z, C, S, S)``, taken in the
        reference pose when pose normalisation is on; ``image``: the case's prepared slices
        ``(Z, S, S)``, which an image-aware QC module reads (a mask-only one ignores them)."""
        return reconstruct_posed(self.model_set.qc, probabilities, self.pose, image)

    def candidate_probabilities(
        self, image: np.ndarray, origin: CaseOrigin | None = None
    ) -> list[np.ndarray]:
        """Softmax maps ``(Z, C, S, S)`` of every candidate for one prepared image stack
        (``origin``: the case it was prepared from, which models qcloop did not train need)."""
        return [
            net_probabilities(m, image, self.batch_size, origin) for m in self.model_set.candidates
        ]

    def score(
        self,
        key: dict[str, Any],
        image: np.ndarray,
        spacing: Sequence[float],
        origin: CaseOrigin | None = None,
    ) -> tuple[ScoredCase, list[np.ndarray]]:
        """Score one prepared case (image ``(Z, S, S)``, spacing in that axis order; ``origin``
        as for :meth:`candidate_probabilities`)."""
        probs = self.candidate_probabilities(image, origin)
        per_candidate = []
        labels = [p.argmax(1) for p in probs]
        for p, lab in zip(probs, labels, strict=True):
            recon = self.reconstruct(p, image)
            per_candidate.append(
                pseudo_metrics(lab, recon.argmax(1), spacing, voxel_units=self.voxel_units)
            )
        scored = ScoredCase(
            key=key,
            spacing=tuple(float(s) for s in spacing),
            candidates=per_candidate,
            decision_structure=self.decision_structure,
            extra={"signals": case_signals(probs, labels)},
        )
        return scored, probs


def fit_population_fences(
    scored: Iterable[ScoredCase],
    strategy: Any,
    group: Callable[[ScoredCase], str],
    *,
    skip_unfittable: bool = False,
) -> dict[str, Any]:
    """Fit fences per group (e.g. phase) on each case's best pDC/pHD over candidates.

    With ``skip_unfittable`` a group whose scores cannot give fences (e.g. every case has an
    empty structure) is logged and left out instead of raising ``ValueError``.
    """
    groups: dict[str, list[tuple[float, float, bool]]] = {}
    for s in scored:
        groups.setdefault(group(s), []).append(s.best())
    fences = {}
    for name, values in groups.items():
        pdc, phd, pen = zip(*values, strict=True)
        try:
            fences[name] = strategy.fit(list(pdc), list(phd), penalised=list(pen))
        except ValueError as exc:
            if not skip_unfittable:
                raise
            log.warning("no fences for group %s: %s", name, exc)
    return fences


def selected_probabilities(scored: ScoredCase, probs: Sequence[np.ndarray]) -> np.ndarray:
    """The QC-selected softmax map of a judged case."""
    if scored.selection is None:
        raise ValueError("case has not been judged: no selection")
    return apply_selection(scored.selection, probs)
