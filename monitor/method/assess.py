"""`qcloop assess` / `predict`: every case scored by every candidate and the QC module, judged
against its fences, the output chosen by QC-based selection."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor.core import atomic
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.events import CaseScored
from qcloop.monitor.core.interfaces import Tracker
from qcloop.monitor.core.optional import require
from qcloop.monitor.core.progress import progress
from qcloop.monitor.core.resolve import build_threshold_strategy
from qcloop.monitor.core.tracking import log_file, make_tracker
from qcloop.monitor.data import CaseError, discover
from qcloop.monitor.method.assessment import Assessor, ScoredCase, fit_population_fences
from qcloop.monitor.method.cases import (
    PreparedCase,
    compute_true,
    load_prepared,
    make_preprocessor,
    restore_labels,
)
from qcloop.monitor.method.run_folder import (
    ModelSet,
    RunError,
    configured_pose,
    load_model_set,
    load_run_config,
    run_views,
)
from qcloop.monitor.report.case_figure import case_figure_png, wants_figure

log = logging.getLogger(__name__)


def make_assessor(model_set: ModelSet, cfg: QcloopConfig) -> Assessor:
    """An assessor configured from ``cfg``."""
    a = cfg.assessment
    return Assessor(
        model_set,
        decision_structure=a.decision_structure,
        voxel_units=a.hd_units == "voxel",
        pose=configured_pose(cfg, model_set.pose, model_set.view),
    )


@dataclass
class Assessed:
    """A scored and judged case, with its candidates' probabilities while they are needed."""

    item: PreparedCase
    scored: ScoredCase
    probs: list[np.ndarray] = field(default_factory=list)


CaseCallback = Callable[[Assessed], None]


def assess_prepared(
    model_set: ModelSet,
    cases: Sequence[PreparedCase],
    cfg: QcloopConfig,
    on_case: CaseCallback | None = None,
) -> list[ScoredCase]:
    """Score, judge and select every case; ``on_case`` sees each case with its probabilities.

    With reference fences each case is judged as soon as it is scored; with transductive fences
    the whole population is scored first, fences are fitted per phase, and candidates' maps are
    recomputed for the callback (nothing large is held for the whole population).
    """
    assessor = make_assessor(model_set, cfg)
    transductive = cfg.assessment.population == "transductive"
    scored_all: list[ScoredCase] = []
    for item in progress(cases, desc=f"assessing {model_set.view}"):
        scored, probs = assessor.score(item.key, item.prepared.image, item.net_spacing, item.origin)
        scored_all.append(scored)
        if transductive:
            continue
        scored.judge(reference_fences(model_set, item.case.phase))
        if on_case is not None:
            on_case(Assessed(item, scored, probs))
    if transductive and scored_all:
        strategy = build_threshold_strategy(cfg)
        fences = fit_population_fences(scored_all, strategy, case_phase, skip_unfittable=True)
        missing = {case_phase(s) for s in scored_all} - set(fences)
        if missing:
            # a phase whose every case is penalised is judged with the pooled fences
            fences.update(
                {
                    p: fit_population_fences(scored_all, strategy, lambda s: "all")["all"]
                    for p in missing
                }
            )
        for item, scored in zip(cases, scored_all, strict=True):
            scored.judge(fences[case_phase(scored)])
            if on_case is not None:
                on_case(
                    Assessed(
                        item,
                        scored,
                        assessor.candidate_probabilities(item.prepared.image, item.origin),
                    )
                )
    return scored_all


def reference_fences(model_set: ModelSet, phase: str) -> Any:
    """The reference fences of ``phase`` (pooled fences for a phase not calibrated)."""
    if phase in model_set.fences:
        return model_set.fences[phase]
    if "all" in model_set.fences:
        return model_set.fences["all"]
    raise CaseError(phase, "the run has no reference fences; use population: transductive")


def case_phase(scored: ScoredCase) -> str:
    """The cardiac phase of a scored case (fences are fitted per phase)."""
    return str(scored.key["phase"])


def flag_collector(flagged: list[Assessed]) -> CaseCallback:
    """A case callback that keeps each OoD case with its QC-selected map (what refiners need)."""

    def keep(a: Assessed) -> None:
        if a.scored.ood:
            flagged.append(Assessed(a.item, a.scored, [_selected(a).astype(np.float32)]))

    return keep


def _selected(a: Assessed) -> np.ndarray:
    from qcloop.monitor.method.assessment import selected_probabilities

    return selected_probabilities(a.scored, a.probs)


def assess_run(
    data_dir: str | Path,
    run_dir: str | Path | Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    write_masks: bool = False,
    views: Sequence[str] | None = None,
    where: dict[str, Any] | None = None,
    tracker: Tracker | None = None,
    model_info: Mapping[str, dict[str, Any]] | None = None,
    figures: str = "none",
) -> dict[str, Any]:
    """Assess (and with ``write_masks`` predict) every case of ``data_dir`` with a run.

    ``run_dir`` is one run folder, or a mapping view -> run folder (registered versions of
    each view resolved from the registry live in separate folders); ``model_info`` adds a
    ``model`` field (e.g. registered name and version) to each view's records.

    Writes ``out_dir/records.jsonl`` (one JSON record per case, in case order) and
    ``out_dir/summary.json``; with ``write_masks`` the QC-selected masks go to
    ``out_dir/masks/<subject>_<view>_<phase>_pred.nii.gz`` on the original grid with the
    original affine and header. Bad cases are reported in the summary and skipped. ``figures``
    (``flagged``, ``all``, ``none``) picks the cases whose QC figure
    (:mod:`~qcloop.monitor.report.case_figure`) goes to ``out_dir/figures/`` (record field
    ``figure``).

    With a tracker (``tracker``, else the run's configured one) the assessment is one tracked
    run: per view the case and OoD counts and the OoD fraction, and ``summary.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = _view_runs(run_dir, views)
    run = next(iter(runs.values()))
    cfg = load_run_config(run)
    all_sources = discover(data_dir, where=where)
    writer = _RecordWriter(out, write_masks, figures)
    errors: list[CaseError] = []
    per_view: dict[str, Any] = {}
    for view, view_run in runs.items():
        view_cfg = load_run_config(view_run) if view_run != run else cfg
        model_set = load_model_set(view_run, view, view_cfg)
        info = {"run": str(view_run.resolve()), **dict((model_info or {}).get(view, {}))}
        pre = make_preprocessor(view_cfg, getattr(model_set.best, "divisor", 1))
        cases = load_prepared([s for s in all_sources if s.view == view], pre, errors)
        reconstruct = make_assessor(model_set, view_cfg).reconstruct
        scored = assess_prepared(model_set, cases, view_cfg, writer.callback(info, reconstruct))
        per_view[view] = {
            "cases": len(scored),
            "ood": sum(bool(s.ood) for s in scored),
            "population": view_cfg.assessment.population,
        }
    records = writer.records
    atomic.write_text(
        out / "records.jsonl", "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    )
    summary = {
        "run": str(run.resolve()),
        "runs": {v: str(r.resolve()) for v, r in runs.items()},
        "data": str(Path(data_dir).resolve()),
        "views": per_view,
        "cases": len(records),
        "ood": sum(bool(r.get("ood")) for r in records),
        "skipped": [{"path": str(e.path), "reason": e.reason} for e in errors],
    }
    atomic.write_json(out / "summary.json", summary)
    tracker = tracker if tracker is not None else make_tracker(cfg)
    _log_assessment(tracker, out, summary, write_masks)
    return summary


def _view_runs(
    run_dir: str | Path | Mapping[str, str | Path], views: Sequence[str] | None
) -> dict[str, Path]:
    """View -> run folder assessing it: ``views`` (all the run's by default) of one folder, or
    the chosen entries of a mapping."""
    if isinstance(run_dir, Mapping):
        runs = {v: Path(r) for v, r in run_dir.items() if views is None or v in views}
        if not runs:
            raise RunError(f"no run folder for the views {list(views or [])}")
        return runs
    one = Path(run_dir)
    return {v: one for v in (views or run_views(one))}


class _RecordWriter:
    """Turns assessed cases into records (with true scores where ground truth exists, and the
    QC-selected mask written with ``write_masks``), and broadcasts each as ``CaseScored``."""

    def __init__(self, out: Path, write_masks: bool, figures: str = "none") -> None:
        from qcloop.monitor.core.plugin_manager import get_plugin_manager

        wants_figure(figures, None)  # a ValueError for an unknown choice, before any work
        if figures != "none":
            require("matplotlib", "report", "case figures (--figures)")
        self.out = out
        self.write_masks = write_masks
        self.figures = figures
        self.records: list[dict[str, Any]] = []
        self.pm = get_plugin_manager()

    def callback(
        self, info: dict[str, Any], reconstruct: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> CaseCallback:
        """The case callback of one view, whose records carry ``info`` as their ``model``;
        ``reconstruct`` (the view's QC reconstruction) draws the case figures."""

        def emit(a: Assessed) -> None:
            self.write(a, info, reconstruct)

        return emit

    def _figure(
        self, a: Assessed, rec: dict[str, Any], reconstruct: Callable[[np.ndarray], np.ndarray]
    ) -> None:
        """Draw the case's QC figure into ``figures/``; a failure is recorded, never raised."""
        src = a.item.case.source
        path = self.out / "figures" / f"{src.subject}_{src.view}_{src.phase}.png"
        try:
            selected = _selected(a)
            recon = reconstruct(selected).argmax(1)
            png = case_figure_png(a.item.prepared.image, selected.argmax(1), recon, rec)
            atomic.write_bytes(path, png)
        except Exception as exc:  # the record matters more than its picture
            log.warning("%s: no figure (%s)", src.image_path, exc)
            rec["figure_error"] = str(exc)
            return
        rec["figure"] = str(path)

    def write(
        self,
        a: Assessed,
        info: dict[str, Any],
        reconstruct: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """Record one assessed case (with its figure where asked) and broadcast it."""
        from qcloop.monitor.data import save_label_map

        rec = a.scored.to_record()
        rec["model"] = info
        labels = None
        if a.item.case.gt is not None or self.write_masks:
            labels = restore_labels(a.item, _selected(a))
        if a.item.case.gt is not None:
            rec["true_selected"] = {
                s: {"dice": v.dice, "hd_mm": v.hd}
                for s, v in compute_true(labels, a.item.case).items()
            }
        if self.write_masks:
            src = a.item.case.source
            path = self.out / "masks" / f"{src.subject}_{src.view}_{src.phase}_pred.nii.gz"
            save_label_map(path, labels, a.item.case)
            rec["mask"] = str(path)
        if reconstruct is not None and wants_figure(self.figures, rec.get("ood")):
            self._figure(a, rec, reconstruct)
        self.records.append(rec)
        self.pm.emit(CaseScored(rec))  # one broadcast per case, after the work is done


def _log_assessment(
    tracker: Tracker, out: Path, summary: dict[str, Any], write_masks: bool
) -> None:
    """One tracked run: case, OoD and skipped counts, per view the OoD fraction, the summary."""
    run_tags = {"qcloop.kind": "assess", "qcloop.run_dir": summary["run"]}
    with tracker.start_run(f"assess {out.name}", tags=run_tags):
        tracker.log_params(
            {"data": summary["data"], "run": summary["run"], "write_masks": write_masks}
        )
        metrics = {"cases": float(summary["cases"]), "ood": float(summary["ood"])}
        metrics["skipped"] = float(len(summary["skipped"]))
        for view, d in summary["views"].items():
            metrics[f"{view}.cases"] = float(d["cases"])
            metrics[f"{view}.ood"] = float(d["ood"])
            if d["cases"]:
                metrics[f"{view}.ood_fraction"] = d["ood"] / d["cases"]
        tracker.log_metrics(metrics)
        log_file(tracker, out / "summary.json")
