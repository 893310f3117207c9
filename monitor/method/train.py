"""`qcloop train`: candidates (m_best checkpoints) and the QC module per view, then the
reference fences calibrated on the validation cases."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qcloop.monitor import __version__
from qcloop.monitor.core import atomic
from qcloop.monitor.core.config import QcloopConfig, dump_config
from qcloop.monitor.core.interfaces import Tracker
from qcloop.monitor.core.resolve import build_segmenter, build_threshold_strategy
from qcloop.monitor.core.serialise import utc_now
from qcloop.monitor.core.slices import SliceSet
from qcloop.monitor.core.tracking import NullTracker, log_file, make_tracker, run_params
from qcloop.monitor.data import CaseSource, discover
from qcloop.monitor.method.assess import case_phase, make_assessor
from qcloop.monitor.method.assessment import ScoredCase, fit_population_fences
from qcloop.monitor.method.cases import PreparedCase
from qcloop.monitor.method.fences_file import (
    ReferenceFences,
    reference_summary,
    save_reference_fences,
)
from qcloop.monitor.method.qc_train import load_labelled_view, train_qc_module
from qcloop.monitor.method.reference_rate import leave_one_out_flags
from qcloop.monitor.method.run_folder import ModelSet, RunError, load_model_set
from qcloop.monitor.method.segmenter_training import (
    TrainResult,
    TrainSettings,
    ValCase,
    train_segmenter,
)

log = logging.getLogger(__name__)


def train_settings(cfg: QcloopConfig, n_slices: int | None = None) -> TrainSettings:
    """Training settings from the configuration; with ``n_slices`` the epochs are raised so
    that training runs at least ``training.min_steps`` optimisation steps."""
    t = cfg.training
    epochs = t.epochs
    if n_slices:
        per_epoch = min(n_slices, t.max_slices_per_epoch or n_slices)
        steps_per_epoch = max(1, per_epoch // t.batch_size)
        epochs = max(epochs, -(-t.min_steps // steps_per_epoch))
    return TrainSettings(
        epochs=epochs,
        batch_size=t.batch_size,
        m_best=t.m_best,
        val_every=t.val_every,
        flip=t.augmentation.flip,
        rotation_deg=t.augmentation.rotation_deg,
        scale=tuple(t.augmentation.scale),
        max_slices_per_epoch=t.max_slices_per_epoch,
        lr=t.lr,
        seed=cfg.seed,
        checkpoint_gap=t.checkpoint_gap,
    )


def train_run(
    data_dir: str | Path,
    run_dir: str | Path,
    cfg: QcloopConfig,
    views: Sequence[str] | None = None,
    *,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Train M (keeping m_best candidates) and R per view, then calibrate reference fences.

    With a tracker (``tracker``, else ``tracking.tracker`` of ``cfg``) this is one tracked run
    (params: the configuration; artifacts: config.yaml, run.json) with a nested run per view
    (per-epoch segmenter and QC-module metrics; candidates.json, fences.json, histories) and a
    nested calibration run.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run / "config.yaml", dump_config(cfg))
    views = list(views or cfg.views)
    tracker = tracker if tracker is not None else make_tracker(cfg)
    all_sources = discover(data_dir)
    info: dict[str, Any] = {
        "qcloop_version": __version__,
        "kind": "trained",
        "created": utc_now(),
        "data": str(Path(data_dir).resolve()),
        "views": {},
        "parent": None,
    }
    run_tags = {"qcloop.kind": "train", "qcloop.run_dir": str(run.resolve())}
    with tracker.start_run(f"train {run.name}", tags=run_tags):
        tracker.log_params(run_params(cfg, info["data"], views))
        log_file(tracker, run / "config.yaml")
        for view in views:
            with tracker.start_run(f"train {run.name} {view}", tags={"qcloop.view": view}):
                info["views"][view] = _train_view(
                    view, all_sources, data_dir, run, cfg, tracker=tracker
                )
        atomic.write_json(run / "run.json", info)
        log_file(tracker, run / "run.json")
    return info


def _train_view(
    view: str,
    all_sources: Sequence[CaseSource],
    data_dir: str | Path,
    run: Path,
    cfg: QcloopConfig,
    *,
    tracker: Tracker,
) -> dict[str, Any]:
    """Train one view's candidates and QC module and calibrate its fences (inside a run)."""
    # seed the initial weights per view, so a view's result does not depend on the others
    torch.manual_seed(cfg.seed)
    model = build_segmenter(cfg.segmenter.name, cfg.segmenter.params)
    data = load_labelled_view(view, all_sources, data_dir, cfg, getattr(model, "divisor", 1))
    view_dir = run / view
    counts = data.counts
    log.info(
        "%s: training %s on %d slices (%d cases), validating on %d cases",
        view,
        cfg.segmenter.name,
        len(data.slices),
        len(data.train_cases),
        len(data.val),
    )
    result = _train_candidates(model, data.slices, data.val, view, view_dir, cfg, counts, tracker)
    train_qc_module(data, view_dir, cfg, tracker)
    model_set = load_model_set(run, view, cfg, fences=False)  # new fences replace any old ones
    fences = calibrate_reference_fences(model_set, data.val_cases, cfg, tracker=tracker)
    save_reference_fences(view_dir, fences)
    if result.checkpoints:
        tracker.log_metrics({"best_val_dice": float(result.checkpoints[0].val_dice)})
    for name in ("candidates.json", "fences.json"):
        log_file(tracker, view_dir / name, view)
    for name in ("history.json", "qc_history.json"):
        log_file(tracker, view_dir / "training" / name, f"{view}/training")
    return {
        **counts,
        "candidates": [c.to_dict() for c in result.checkpoints],
        "skipped": [str(e) for e in data.errors],
    }


def _train_candidates(
    model: torch.nn.Module,
    slices: SliceSet,
    val: Sequence[ValCase],
    view: str,
    view_dir: Path,
    cfg: QcloopConfig,
    counts: dict[str, int],
    tracker: Tracker,
) -> TrainResult:
    """Train the segmenter, keeping its candidates; write ``candidates.json`` and the history."""
    settings = train_settings(cfg, len(slices))
    tracker.log_params({"view": view, **counts, "epochs": settings.epochs})
    meta = {"segmenter": cfg.segmenter.name, "params": cfg.segmenter.params, "view": view}
    result = train_segmenter(
        model, slices, val, settings, view_dir, model_meta=meta, log_metrics=tracker.log_metrics
    )
    atomic.write_json(
        view_dir / "candidates.json",
        [{**c.to_dict(), "view": view} for c in result.checkpoints],
    )
    atomic.write_json(view_dir / "training" / "history.json", result.history)
    return result


def calibrate_reference_fences(
    model_set: ModelSet,
    val_cases: Sequence[PreparedCase],
    cfg: QcloopConfig,
    *,
    tracker: Tracker | None = None,
) -> ReferenceFences:
    """Fences per phase (and pooled as ``"all"``) from the validation cases' QC scores, with
    the strategy that fitted them and the cases' median decision pDC (the monitor's reference).

    With a tracker, a nested run records the strategy and each phase's fences as metrics
    (``fence.<phase>.pdc_low``, ``fence.<phase>.phd_high``) and ``fences.json``.
    """
    assessor = make_assessor(model_set, cfg)
    scored = [
        assessor.score(c.key, c.prepared.image, c.net_spacing, c.origin)[0] for c in val_cases
    ]
    return fit_reference_fences(scored, model_set.view, cfg, tracker=tracker)


def fit_reference_fences(
    scored: Sequence[ScoredCase],
    view: str,
    cfg: QcloopConfig,
    *,
    tracker: Tracker | None = None,
) -> ReferenceFences:
    """Reference fences per phase and pooled (``"all"``) fitted on scored reference cases by
    the configured strategy (see :func:`calibrate_reference_fences`)."""
    tracker = tracker if tracker is not None else NullTracker()
    th = cfg.assessment.thresholds
    with tracker.start_run(f"calibrate {view}", tags={"qcloop.view": view}):
        tracker.log_params({"strategy": th.name, "strategy_params": dict(th.params)})
        strategy = build_threshold_strategy(cfg)
        fences = fit_population_fences(scored, strategy, case_phase, skip_unfittable=True)
        fences.update(
            fit_population_fences(scored, strategy, lambda s: "all", skip_unfittable=True)
        )
        if "all" not in fences:
            raise RunError(
                f"{view}: reference fences cannot be calibrated on the {len(scored)} reference "
                "cases; the model fails them (train longer) or use population: transductive"
            )
        metrics = {"calibration_cases": float(len(scored))}
        for phase, f in fences.items():
            metrics[f"fence.{phase}.pdc_low"] = float(f.pdc_low)
            metrics[f"fence.{phase}.phd_high"] = float(f.phd_high)
        tracker.log_metrics(metrics)
        reference = reference_summary([s.best()[0] for s in scored])
        if reference is not None:  # the flag rate of new in-distribution cases, for the monitor
            reference.update(leave_one_out_flags(scored, strategy, case_phase))
        result = ReferenceFences(th, fences, reference)
        if not isinstance(tracker, NullTracker):
            with tempfile.TemporaryDirectory(prefix="qcloop-fences-") as tmp:
                tracker.log_artifact(str(save_reference_fences(Path(tmp), result)), view)
    return result
