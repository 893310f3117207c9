"""`qcloop assess` / `predict`: every case scored by every candidate and the QC module, judged
against its fences, the output chosen by QC-based selection."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from qcloop.monitor.data import CaseError, CaseSource
from qcloop.monitor.method.assessment import Assessor, ScoredCase, fit_population_fences
from qcloop.monitor.method.case_worker import (
    Assessed,
    Outcome,
    ViewJob,
    case_record,
    selected_map,
)
from qcloop.monitor.method.cases import PreparedCase, load_prepared, make_preprocessor
from qcloop.monitor.method.quality_estimate import Estimator, load_estimator
from qcloop.monitor.method.run_folder import (
    ModelSet,
    RunError,
    configured_pose,
    load_model_set,
    load_run_config,
    run_views,
)
from qcloop.monitor.report.case_figure import wants_figure

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


def flag_collector(flagged: list[Assessed], estimator: Estimator | None = None) -> CaseCallback:
    """A case callback that keeps each OoD case with its QC-selected map (what refiners need);
    with an ``estimator`` that flags (``assessment.flag_on: est``) its verdict decides."""

    def keep(a: Assessed) -> None:
        if estimator is not None and estimator.flag_below is not None:
            rec = a.scored.to_record()
            estimator.apply(rec)
            a.scored.ood = rec["ood"]
        if a.scored.ood:
            flagged.append(Assessed(a.item, a.scored, [selected_map(a).astype(np.float32)]))

    return keep


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
    engine: str = "local",
    engine_params: Mapping[str, Any] | None = None,
    estimate_flags: bool = True,
) -> dict[str, Any]:
    """Assess (and with ``write_masks`` predict) every case of ``data_dir`` with a run.

    ``data_dir`` is a dataset folder, a CSV/Parquet case list or a glob
    (:func:`~qcloop.monitor.data.case_list.find_cases`). ``run_dir`` is one run folder, or a
    mapping view -> run folder (registered versions of each view resolved from the registry
    live in separate folders); ``model_info`` adds a ``model`` field (e.g. registered name and
    version) to each view's records. ``engine`` names the registered engine doing the per-case
    work (``local``, ``ray``; built with ``engine_params``); records are the same either way.
    ``estimate_flags=False`` leaves the OoD flag to the fences where the run flags on the
    calibrated estimate (``qcloop fit-estimator`` scores the cases it fits on this way).

    ``out_dir`` is a folder, or a URI of a pyarrow filesystem (``s3://bucket/qc``: outputs are
    written locally, then copied there; :mod:`~qcloop.monitor.core.object_store`).
    Writes ``out_dir/records.jsonl`` (one JSON record per case, in case order, streamed to a
    temporary file renamed when complete) and ``out_dir/summary.json``; with ``write_masks``
    the QC-selected masks go to ``out_dir/masks/<subject>_<view>_<phase>_pred.nii.gz`` on the
    original grid with the original affine and header. Bad cases are reported in the summary
    and skipped. ``figures`` (``flagged``, ``all``, ``none``) picks the cases whose QC figure
    (:mod:`~qcloop.monitor.report.case_figure`) goes to ``out_dir/figures/`` (record field
    ``figure``).

    With a tracker (``tracker``, else the run's configured one) the assessment is one tracked
    run: per view the case and OoD counts and the OoD fraction, and ``summary.json``.
    """
    from qcloop.monitor.core.object_store import open_store

    with _output_folder(out_dir) as (out, store):
        summary = _assess_into(
            out, store, data_dir, run_dir, views, write_masks, where, tracker, model_info,
            figures, engine, engine_params, estimate_flags,
        )  # fmt: skip
        if store is not None:
            for name in ("records.jsonl", "summary.json"):  # summary last: the batch is done
                open_store(store).put(out / name, name)
    return summary


@contextlib.contextmanager
def _output_folder(out_dir: Path | str) -> Iterator[tuple[Path, str | None]]:
    """The local folder outputs are written to, and the store URI they are copied to (a
    scratch folder removed on the way out), or ``out_dir`` itself and ``None``."""
    from qcloop.monitor.core.object_store import is_uri, open_store

    if not is_uri(out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        yield Path(out_dir), None
        return
    open_store(str(out_dir))  # an unusable URI fails here, before any work
    scratch = Path(tempfile.mkdtemp(prefix="qcloop-out-"))
    try:
        yield scratch, str(out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _assess_into(
    out: Path,
    store: str | None,
    data_dir: str | Path,
    run_dir: str | Path | Mapping[str, str | Path],
    views: Sequence[str] | None,
    write_masks: bool,
    where: dict[str, Any] | None,
    tracker: Tracker | None,
    model_info: Mapping[str, dict[str, Any]] | None,
    figures: str,
    engine: str,
    engine_params: Mapping[str, Any] | None,
    estimate_flags: bool = True,
) -> dict[str, Any]:
    """:func:`assess_run` into the local folder ``out`` (records naming ``store`` URIs)."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager
    from qcloop.monitor.data.case_list import find_cases

    runs = _view_runs(run_dir, views)
    run = next(iter(runs.values()))
    cfg = load_run_config(run)
    all_sources = find_cases(data_dir, where=where)
    _check_figures(figures)
    factory = get_plugin_manager().engines()[engine].factory
    sink = _RecordSink(out)
    per_view: dict[str, Any] = {}
    with sink, factory(**dict(engine_params or {})) as eng:
        for view, view_run in runs.items():
            view_cfg = load_run_config(view_run) if view_run != run else cfg
            info = {"run": str(view_run.resolve()), **dict((model_info or {}).get(view, {}))}
            job = ViewJob(view, view_run, out, info, write_masks, figures, store=store,
                          estimate_flags=estimate_flags)  # fmt: skip
            sources = [s for s in all_sources if s.view == view]
            if view_cfg.assessment.population == "transductive" and eng.name != "local":
                raise RunError(
                    f"{view_run}: transductive fences need the whole population at once; "
                    f"--engine {eng.name} judges case by case (use the local engine)"
                )
            if view_cfg.assessment.population == "transductive":
                outcomes = _transductive_outcomes(job, sources, view_cfg)
            else:
                outcomes = eng.outcomes(job, sources)
            per_view[view] = sink.add_view(outcomes, view_cfg.assessment.population)
    for folder in ("masks", "figures"):  # what a killed worker left before its rename
        atomic.remove_temporaries(out / folder)
    summary = {
        "run": str(run.resolve()),
        "runs": {v: str(r.resolve()) for v, r in runs.items()},
        "data": str(Path(data_dir).resolve()),
        "out": store or str(out.resolve()),
        "engine": engine,
        "views": per_view,
        "cases": sink.cases,
        "ood": sink.ood,
        "skipped": sink.skipped,
    }
    atomic.write_json(out / "summary.json", summary)
    tracker = tracker if tracker is not None else make_tracker(cfg)
    _log_assessment(tracker, out, summary, write_masks)
    return summary


def _check_figures(figures: str) -> None:
    """A ``ValueError`` for an unknown figure choice, a missing extra for figures, before any
    work."""
    wants_figure(figures, None)
    if figures != "none":
        require("matplotlib", "report", "case figures (--figures)")


def _transductive_outcomes(
    job: ViewJob, sources: Sequence[CaseSource], cfg: QcloopConfig
) -> Iterator[Outcome]:
    """The outcomes of a view judged by fences fitted on its own population (all cases are
    scored before the first is judged, so this runs in the local process only)."""
    errors: list[CaseError] = []
    model_set = load_model_set(job.run, job.view, cfg)
    pre = make_preprocessor(cfg, getattr(model_set.best, "divisor", 1))
    cases = load_prepared(sources, pre, errors)
    reconstruct = make_assessor(model_set, cfg).reconstruct
    estimator = load_estimator(job.run, job.view, cfg.assessment if job.estimate_flags else None)
    records: list[dict[str, Any]] = []
    assess_prepared(
        model_set, cases, cfg, lambda a: records.append(case_record(a, job, reconstruct, estimator))
    )
    for e in errors:
        yield "skipped", {"path": str(e.path), "reason": e.reason}
    for rec in records:
        yield "record", rec


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


class _RecordSink:
    """Streams each view's outcomes to ``records.jsonl`` (a temporary file, renamed when the
    last view is done) and broadcasts every record as ``CaseScored``; keeps counts, not
    records."""

    def __init__(self, out: Path) -> None:
        from qcloop.monitor.core.plugin_manager import get_plugin_manager

        self.path = out / "records.jsonl"
        self.pm = get_plugin_manager()
        self.cases = 0
        self.ood = 0
        self.skipped: list[dict[str, str]] = []

    def __enter__(self) -> _RecordSink:
        self._paths = atomic.atomic_path(self.path)
        self._file = self._paths.__enter__().open("w", encoding="utf-8")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()
        self._paths.__exit__(*exc)  # renamed into place only when no exception is passing

    def add_view(self, outcomes: Iterable[Outcome], population: str) -> dict[str, Any]:
        """Write a view's outcomes; its case and OoD counts."""
        n = ood = 0
        for kind, payload in outcomes:
            if kind == "skipped":
                self.skipped.append(payload)
                continue
            self._file.write(json.dumps(payload, allow_nan=False) + "\n")
            n += 1
            ood += bool(payload.get("ood"))
            self.pm.emit(CaseScored(payload))  # one broadcast per case, after the work is done
        self._file.flush()
        self.cases += n
        self.ood += ood
        return {"cases": n, "ood": ood, "population": population}


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
