"""``qcloop assess --predictions``: masks that another tool already wrote, scored by a run's QC
module without running any model.

Each mask is matched to its case (``mask_files``), mapped to qcloop's labels, taken to the run's
network grid with the case's ``PreprocessTransform.apply_labels``, and scored as one-hot
probabilities by the QC path that scores candidates (``Assessor.reconstruct``,
``pseudo_metrics``): one ``ScoredCase`` per case with a single "candidate", the mask. Cases are
judged against the run's reference fences when it has them (or fenced on the batch with
``population: transductive``); a QC-only run without fences gives pDC/pHD and ``ood: null``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor.core import atomic
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.events import CaseScored
from qcloop.monitor.core.interfaces import Tracker
from qcloop.monitor.core.progress import progress
from qcloop.monitor.core.resolve import build_threshold_strategy
from qcloop.monitor.core.tracking import make_tracker
from qcloop.monitor.data import CaseError, CaseSource, discover, load_case
from qcloop.monitor.method.assess import (
    _log_assessment,
    case_phase,
    make_assessor,
    reference_fences,
)
from qcloop.monitor.method.assessment import (
    Assessor,
    ScoredCase,
    fit_population_fences,
    pseudo_metrics,
)
from qcloop.monitor.method.cases import compute_true, make_preprocessor, record_key
from qcloop.monitor.method.mask_files import (
    MaskMatch,
    match_by_csv,
    match_by_name,
    parse_label_map,
    read_mask,
)
from qcloop.monitor.method.qc_call import needs_image
from qcloop.monitor.method.qc_train import load_qc_set, qc_views
from qcloop.monitor.method.run_folder import ModelSet, RunError, load_run_config

log = logging.getLogger(__name__)

#: ``source`` of a record scored from a mask made elsewhere.
PREDICTIONS_SOURCE = "predictions"
_NUM_CLASSES = 4

LabelMap = str | Mapping[int, int] | None


def scored_masks(
    run_dir: str | Path,
    data_dir: str | Path,
    masks: str | Path | None,
    cfg: QcloopConfig | None = None,
    *,
    views: Sequence[str] | None = None,
    mapping_csv: str | Path | None = None,
    label_map: LabelMap = None,
    where: dict[str, Any] | None = None,
    judge: bool = True,
) -> tuple[list[ScoredCase], list[CaseError]]:
    """Score the masks under ``masks`` (matched by file name, or by ``mapping_csv``) for the
    cases of ``data_dir`` with the QC module of ``run_dir``, and (with ``judge``; off when the
    scores are to fit fences) judge them as the run can (:func:`judge_masks`).

    ``cfg`` is the run's configuration by default; ``views`` all views with a QC module;
    ``label_map`` the mask values' meaning (``"1:RV,2:MYO,3:LV"`` or value -> qcloop label;
    default qcloop's own). Returns the scored cases in case order (each with ``source`` and
    ``mask`` in its extra fields) and one ``CaseError`` per case that could not be scored, naming
    the file at fault; one bad case never stops the others.
    """
    run = Path(run_dir)
    cfg = cfg if cfg is not None else load_run_config(run)
    lut = as_label_map(label_map)
    views = list(views or qc_views(run))
    if not views:
        raise RunError(f"{run}: no view holds a QC module (qc.pt)")
    matches, errors = _match(discover(data_dir, where=where), views, masks, mapping_csv)
    scored: list[ScoredCase] = []
    for view in views:
        qc_set = load_qc_set(run, view, cfg)
        scorer = _MaskScorer(qc_set, cfg, lut)
        view_scored = []
        for match in progress([m for m in matches if m.source.view == view], desc=view):
            try:
                view_scored.append(scorer.score(match))
            except (CaseError, ValueError) as exc:
                error = exc if isinstance(exc, CaseError) else CaseError(match.mask, str(exc))
                error.key = error.key or match.source.key
                log.warning("skipping %s: %s", match.source.key, error)
                errors.append(error)
        if judge:
            judge_masks(view_scored, qc_set, cfg)
        scored.extend(view_scored)
    return scored, errors


def as_label_map(label_map: LabelMap) -> Mapping[int, int]:
    """Mask value -> qcloop label from a label map's text (``None``: qcloop's own order) or a
    mapping given as it is."""
    if label_map is None or isinstance(label_map, str):
        return parse_label_map(label_map)
    return label_map


def _match(
    sources: Sequence[CaseSource],
    views: Sequence[str],
    masks: str | Path | None,
    mapping_csv: str | Path | None,
) -> tuple[list[MaskMatch], list[CaseError]]:
    """The cases of ``views`` with their masks (by the CSV when given, else by file name under
    ``masks``), and an error for each case or CSV row that has none."""
    if mapping_csv is not None:
        matches, errors = match_by_csv(sources, mapping_csv)
    elif masks is None:
        raise ValueError("give a masks folder or a mapping CSV")
    else:
        matches, errors = match_by_name([s for s in sources if s.view in views], masks)
    matches = [m for m in matches if m.source.view in views]
    errors = [e for e in errors if e.key is None or e.key.split("/")[1] in views]
    return matches, errors


def score_masks(
    run_dir: str | Path,
    data_dir: str | Path,
    masks: str | Path | None,
    cfg: QcloopConfig | None = None,
    *,
    views: Sequence[str] | None = None,
    mapping_csv: str | Path | None = None,
    label_map: LabelMap = None,
    where: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[CaseError]]:
    """:func:`scored_masks` as ``qcloop assess`` records (one JSON-ready dict per case, with
    ``source: "predictions"``, the ``mask`` path and the run as ``model``), and the errors."""
    scored, errors = scored_masks(
        run_dir,
        data_dir,
        masks,
        cfg,
        views=views,
        mapping_csv=mapping_csv,
        label_map=label_map,
        where=where,
    )
    return _records(scored, Path(run_dir), cfg or load_run_config(run_dir)), errors


def _records(
    scored: Sequence[ScoredCase], run: Path, cfg: QcloopConfig, estimate_flags: bool = True
) -> list[dict[str, Any]]:
    """The JSON records of scored masks, with the run that scored them as ``model``
    (``estimate_flags`` as for :class:`~qcloop.monitor.method.case_worker.ViewJob`)."""
    from qcloop.monitor.method.quality_estimate import load_estimator

    model = {"run": str(run.resolve())}
    records = [{**s.to_record(), "model": model} for s in scored]
    views = {r["view"] for r in records}
    rule = cfg.assessment if estimate_flags else None
    estimators = {v: load_estimator(run, v, rule) for v in views}
    for s, rec in zip(scored, records, strict=True):
        estimator = estimators[rec["view"]]
        if estimator is not None:
            estimator.apply(rec)  # with assessment.flag_on: est, it also flags the case
            s.ood = rec["ood"]
    return records


class _MaskScorer:
    """Scores one view's masks with the run's QC module, as ``Assessor.score`` scores a
    candidate's probabilities."""

    def __init__(self, qc_set: ModelSet, cfg: QcloopConfig, label_map: Mapping[int, int]) -> None:
        """A scorer with the QC module, pose and preprocessing of ``qc_set`` and ``cfg``."""
        self.assessor: Assessor = make_assessor(qc_set, cfg)
        self.preprocessor = make_preprocessor(cfg)
        self.label_map = label_map

    def score(self, match: MaskMatch) -> ScoredCase:
        """The QC scores of one mask; ``CaseError`` naming the image or mask at fault."""
        case = load_case(match.source)
        labels = read_mask(match.mask, case, self.label_map)
        image = None
        if needs_image(self.assessor.model_set.qc):  # prepared as the QC module was trained
            image, transform = self.preprocessor.prepare_image(case.image, case.spacing)
        else:
            transform = self.preprocessor.transform_for(case.shape, case.spacing)
        net = transform.apply_labels(labels)
        probs = np.ascontiguousarray(
            np.eye(_NUM_CLASSES, dtype=np.float32)[net].transpose(0, 3, 1, 2)
        )
        sx, sy = transform.resampled_spacing
        spacing = (float(case.spacing[2]), float(sx), float(sy))
        recon = self.assessor.reconstruct(probs, image)
        scores = pseudo_metrics(
            net, recon.argmax(1), spacing, voxel_units=self.assessor.voxel_units
        )
        extra: dict[str, Any] = {"source": PREDICTIONS_SOURCE, "mask": str(match.mask)}
        if case.gt is not None:
            extra["true_selected"] = {
                s: {"dice": v.dice, "hd_mm": v.hd} for s, v in compute_true(labels, case).items()
            }
        return ScoredCase(
            key=record_key(match.source),
            spacing=spacing,
            candidates=[scores],
            decision_structure=self.assessor.decision_structure,
            extra=extra,
        )


def judge_masks(scored: Sequence[ScoredCase], qc_set: ModelSet, cfg: QcloopConfig) -> str:
    """Judge a view's scored masks as the run can, and say how: ``"transductive"`` (fences
    fitted on these cases), ``"reference"`` (the run's fences) or ``"none"`` (a run without
    fences: the cases keep ``ood`` None, and a warning says to calibrate)."""
    if not scored:
        return "none"
    if cfg.assessment.population == "transductive":
        strategy = build_threshold_strategy(cfg)
        fences = fit_population_fences(scored, strategy, case_phase, skip_unfittable=True)
        pooled = fit_population_fences(scored, strategy, lambda s: "all", skip_unfittable=True)
        if "all" in pooled:
            for s in scored:
                s.judge(fences.get(case_phase(s), pooled["all"]))
            return "transductive"
        log.warning("%s: no fences can be fitted on these masks; they are not judged", qc_set.view)
        return "none"
    if not qc_set.fences:
        log.warning(
            "%s: the run has no fences (a QC-only run): records carry pDC/pHD with ood null; "
            "calibrate the run on the monitored model (qcloop calibrate) to judge them",
            qc_set.view,
        )
        return "none"
    for s in scored:
        s.judge(reference_fences(qc_set, case_phase(s)))
    return "reference"


def assess_predictions(
    data_dir: str | Path,
    run_dir: str | Path,
    masks: str | Path | None,
    out_dir: str | Path,
    *,
    views: Sequence[str] | None = None,
    mapping_csv: str | Path | None = None,
    label_map: LabelMap = None,
    where: dict[str, Any] | None = None,
    tracker: Tracker | None = None,
    estimate_flags: bool = True,
) -> dict[str, Any]:
    """``qcloop assess --predictions``: score the masks and write ``out_dir/records.jsonl`` (one
    record per scored case, in case order, each broadcast as ``CaseScored``) and
    ``out_dir/summary.json`` (per view the cases, OoD count and how they were judged; every
    case that could not be scored under ``skipped``, naming the file)."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(run_dir)
    cfg = load_run_config(run)
    lut = as_label_map(label_map)
    views = list(views or qc_views(run))
    scored, errors = scored_masks(
        run, data_dir, masks, cfg, views=views, mapping_csv=mapping_csv, label_map=lut, where=where
    )
    records = _records(scored, run, cfg, estimate_flags)
    pm = get_plugin_manager()
    for rec in records:
        pm.emit(CaseScored(rec))
    atomic.write_text(
        out / "records.jsonl", "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    )
    summary = _summary(run, data_dir, masks, mapping_csv, cfg, scored, errors, views)
    atomic.write_json(out / "summary.json", summary)
    _log_assessment(tracker if tracker is not None else make_tracker(cfg), out, summary, False)
    return summary


def _summary(
    run: Path,
    data_dir: str | Path,
    masks: str | Path | None,
    mapping_csv: str | Path | None,
    cfg: QcloopConfig,
    scored: Sequence[ScoredCase],
    errors: Sequence[CaseError],
    views: Sequence[str],
) -> dict[str, Any]:
    """``summary.json`` of an assessment of masks made elsewhere; a view none of whose cases
    was judged (a run without fences) has population ``"none"``."""
    per_view = {}
    for view in views:
        mine = [s for s in scored if s.key["view"] == view]
        judged = any(s.fences is not None for s in mine)
        per_view[view] = {
            "cases": len(mine),
            "ood": sum(bool(s.ood) for s in mine),
            "population": cfg.assessment.population if judged else "none",
        }
    return {
        "run": str(run.resolve()),
        "runs": {v: str(run.resolve()) for v in views},
        "data": str(Path(data_dir).resolve()),
        "source": PREDICTIONS_SOURCE,
        "predictions": str(Path(masks).resolve()) if masks is not None else None,
        "predictions_map": str(Path(mapping_csv).resolve()) if mapping_csv else None,
        "views": per_view,
        "cases": len(scored),
        "ood": sum(bool(s.ood) for s in scored),
        "skipped": [{"path": str(e.path), "reason": e.reason, "key": e.key} for e in errors],
    }
