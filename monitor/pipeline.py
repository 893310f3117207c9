"""The QC loop on a dataset: train a model set, assess cases, refine on flagged cases, predict.

These functions are what the ``train``, ``assess``, ``refine``, ``predict`` and ``demo``
commands run. Components are resolved from the configuration once; the per-case path calls
plain objects.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcloop.monitor import __version__, atomic
from qcloop.monitor.assessment import Assessor, ScoredCase, fit_population_fences
from qcloop.monitor.components import NullTracker, Tracker
from qcloop.monitor.config import QcloopConfig, dump_config
from qcloop.monitor.data import Case, CaseError, CaseSource, discover, load_cases
from qcloop.monitor.data.preprocess import Prepared, Preprocessor
from qcloop.monitor.modelset import (
    ModelSet,
    RunError,
    build_qc_module,
    build_segmenter,
    configured_pose,
    load_model_set,
    load_run_config,
    qc_params,
    read_run_info,
    run_views,
    save_candidates,
)
from qcloop.monitor.pose import POSE_FILE, PoseReference
from qcloop.monitor.progress import progress
from qcloop.monitor.training import SliceSet, TrainSettings, ValCase, train_segmenter

log = logging.getLogger(__name__)

VAL_SPLITS = ("val", "validation")


def record_key(src: CaseSource) -> dict[str, Any]:
    """Identity fields of a case's JSON record: subject, view, phase, vendor, disease, image."""
    return {
        "subject": src.subject,
        "view": src.view,
        "phase": src.phase,
        "vendor": src.vendor,
        "disease": src.disease,
        "image": str(src.image_path),
    }


@dataclass
class PreparedCase:
    """A loaded case and its network-grid version."""

    case: Case
    prepared: Prepared

    @property
    def key(self) -> dict[str, Any]:
        """Identity fields of the case's JSON record."""
        return record_key(self.case.source)

    @property
    def net_spacing(self) -> tuple[float, float, float]:
        """Spacing in the network array order ``(Z, X, Y)``."""
        sx, sy, sz = self.prepared.spacing
        return (sz, sx, sy)


def make_preprocessor(cfg: QcloopConfig, divisor: int = 1) -> Preprocessor:
    """The preprocessing of the configuration."""
    p = cfg.preprocessing
    return Preprocessor(
        size=p.size,
        target_spacing=p.target_spacing_mm,
        divisor=divisor,
        normalisation=p.normalisation,
    )


def load_prepared(
    sources: Sequence[CaseSource], preprocessor: Preprocessor, errors: list[CaseError] | None = None
) -> list[PreparedCase]:
    """Load and prepare cases; bad cases are logged, recorded in ``errors`` and skipped."""
    report = load_cases(sources)
    if errors is not None:
        errors.extend(report.errors)
    out = []
    for case in progress(report.cases, desc="preparing"):
        try:
            out.append(PreparedCase(case, preprocessor.prepare(case)))
        except (CaseError, ValueError) as exc:
            log.warning("%s: skipped (%s)", case.source.image_path, exc)
            if errors is not None:
                errors.append(
                    exc
                    if isinstance(exc, CaseError)
                    else CaseError(case.source.image_path, str(exc))
                )
    return out


def split_labelled(
    sources: Sequence[CaseSource], val_fraction: float = 0.15, seed: int = 0
) -> tuple[list[CaseSource], list[CaseSource]]:
    """Training and validation cases: by the ``split`` metadata when the layout has it, else a
    deterministic subject-level split of the labelled cases."""
    labelled = [s for s in sources if s.gt_path is not None]
    train = [s for s in labelled if s.split == "train"]
    val = [s for s in labelled if s.split in VAL_SPLITS]
    if train and val:
        return train, val
    subjects = sorted({s.subject for s in labelled})
    rng = np.random.default_rng(seed)
    n_val = max(1, round(len(subjects) * val_fraction)) if len(subjects) > 1 else 0
    val_subjects = set(rng.permutation(subjects)[:n_val].tolist())
    return (
        [s for s in labelled if s.subject not in val_subjects],
        [s for s in labelled if s.subject in val_subjects],
    )


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


def threshold_strategy(cfg: QcloopConfig) -> Any:
    """The configured threshold strategy object."""
    from qcloop.monitor.plugins import get_plugin_manager

    c = cfg.assessment.thresholds
    return get_plugin_manager().threshold_strategies().create(c.name, c.params)


def population(cfg: QcloopConfig) -> str:
    """``reference`` or ``transductive``."""
    return str(cfg.assessment.thresholds.params.get("population", "reference"))


def make_tracker(cfg: QcloopConfig) -> Tracker:
    """The configured tracker (``tracking.tracker``), else one that records nothing."""
    from qcloop.monitor.plugins import get_plugin_manager

    t = cfg.tracking.tracker
    if t is None:
        return NullTracker()
    return get_plugin_manager().trackers().create(t.name, t.params)


def _log_file(tracker: Tracker, path: Path, artifact_path: str | None = None) -> None:
    if path.is_file():
        tracker.log_artifact(str(path), artifact_path)


def _phase(scored: ScoredCase) -> str:
    return str(scored.key["phase"])


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
        "created": _now(),
        "data": str(Path(data_dir).resolve()),
        "views": {},
        "parent": None,
    }
    run_tags = {"qcloop.kind": "train", "qcloop.run_dir": str(run.resolve())}
    with tracker.start_run(f"train {run.name}", tags=run_tags):
        tracker.log_params(
            {**cfg.model_dump(mode="json"), "data": info["data"], "train_views": ",".join(views)}
        )
        _log_file(tracker, run / "config.yaml")
        for view in views:
            with tracker.start_run(f"train {run.name} {view}", tags={"qcloop.view": view}):
                info["views"][view] = _train_view(
                    view, all_sources, data_dir, run, cfg, tracker=tracker
                )
        atomic.write_json(run / "run.json", info)
        _log_file(tracker, run / "run.json")
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
    sources = [s for s in all_sources if s.view == view]
    train_src, val_src = split_labelled(sources, seed=cfg.seed)
    if not train_src or not val_src:
        raise CaseError(data_dir, f"no labelled {view} cases to train and validate on")
    # seed the initial weights per view, so a view's result does not depend on the others
    torch.manual_seed(cfg.seed)
    model = build_segmenter(cfg.segmenter.name, cfg.segmenter.params)
    pre = make_preprocessor(cfg, getattr(model, "divisor", 1))
    errors: list[CaseError] = []
    train_cases = load_prepared(train_src, pre, errors)
    val_cases = load_prepared(val_src, pre, errors)
    slices = SliceSet.from_stacks(
        [c.prepared.image for c in train_cases], [c.prepared.gt for c in train_cases]
    )
    val = [ValCase(c.prepared.image, c.prepared.gt) for c in val_cases]
    view_dir = run / view
    log.info(
        "%s: training %s on %d slices (%d cases), validating on %d cases",
        view,
        cfg.segmenter.name,
        len(slices),
        len(train_cases),
        len(val),
    )
    settings = train_settings(cfg, len(slices))
    tracker.log_params(
        {
            "view": view,
            "train_cases": len(train_cases),
            "val_cases": len(val),
            "train_slices": len(slices),
            "epochs": settings.epochs,
        }
    )
    meta = {"segmenter": cfg.segmenter.name, "params": cfg.segmenter.params, "view": view}
    result = train_segmenter(
        model, slices, val, settings, view_dir, model_meta=meta, log_metrics=tracker.log_metrics
    )
    atomic.write_json(
        view_dir / "candidates.json",
        [{**c.to_dict(), "view": view} for c in result.checkpoints],
    )
    atomic.write_json(view_dir / "training" / "history.json", result.history)

    qc = build_qc_module(cfg.qc.module.name, qc_params(cfg, view, len(slices)))
    qc_history = qc.fit(
        slices.labels,
        np.concatenate([v.labels for v in val]),
        seed=cfg.seed,
        log=tracker.log_metrics,  # the QC module names its figures qc/...
    )
    atomic.torch_save(qc.state_dict(), view_dir / "qc.pt")
    try:
        pose = PoseReference.from_ground_truth([c.prepared.gt for c in train_cases])
        atomic.write_json(view_dir / POSE_FILE, pose.to_dict())
    except ValueError as exc:
        log.warning("%s: no reference pose recorded: %s", view, exc)
    atomic.write_json(view_dir / "training" / "qc_history.json", _jsonable(qc_history))

    model_set = load_model_set(run, view, cfg)
    fences = calibrate_reference_fences(model_set, val_cases, cfg, tracker=tracker)
    atomic.write_json(view_dir / "fences.json", {k: f.to_dict() for k, f in fences.items()})
    if result.checkpoints:
        tracker.log_metrics({"best_val_dice": float(result.checkpoints[0].val_dice)})
    for name in ("candidates.json", "fences.json"):
        _log_file(tracker, view_dir / name, view)
    for name in ("history.json", "qc_history.json"):
        _log_file(tracker, view_dir / "training" / name, f"{view}/training")
    return {
        "train_cases": len(train_cases),
        "val_cases": len(val),
        "train_slices": len(slices),
        "candidates": [c.to_dict() for c in result.checkpoints],
        "skipped": [str(e) for e in errors],
    }


def calibrate_reference_fences(
    model_set: ModelSet,
    val_cases: Sequence[PreparedCase],
    cfg: QcloopConfig,
    *,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Fences per phase (and pooled as ``"all"``) from the validation cases' QC scores.

    With a tracker, a nested run records the strategy and each phase's fences as metrics
    (``fence.<phase>.pdc_low``, ``fence.<phase>.phd_high``) and ``fences.json``.
    """
    tracker = tracker if tracker is not None else NullTracker()
    th = cfg.assessment.thresholds
    with tracker.start_run(f"calibrate {model_set.view}", tags={"qcloop.view": model_set.view}):
        tracker.log_params({"strategy": th.name, "strategy_params": dict(th.params)})
        assessor = make_assessor(model_set, cfg)
        scored = [assessor.score(c.key, c.prepared.image, c.net_spacing)[0] for c in val_cases]
        strategy = threshold_strategy(cfg)
        fences = fit_population_fences(scored, strategy, _phase, skip_unfittable=True)
        fences.update(
            fit_population_fences(scored, strategy, lambda s: "all", skip_unfittable=True)
        )
        if "all" not in fences:
            raise RunError(
                f"{model_set.view}: reference fences cannot be calibrated on the validation "
                "cases; the model set fails them (train longer) or use population: transductive"
            )
        metrics = {"calibration_cases": float(len(scored))}
        for phase, f in fences.items():
            metrics[f"fence.{phase}.pdc_low"] = float(f.pdc_low)
            metrics[f"fence.{phase}.phd_high"] = float(f.phd_high)
        tracker.log_metrics(metrics)
        if not isinstance(tracker, NullTracker):
            with tempfile.TemporaryDirectory(prefix="qcloop-fences-") as tmp:
                path = Path(tmp) / "fences.json"
                atomic.write_json(path, {k: f.to_dict() for k, f in fences.items()})
                tracker.log_artifact(str(path), model_set.view)
    return fences


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
    transductive = population(cfg) == "transductive"
    scored_all: list[ScoredCase] = []
    for item in progress(cases, desc=f"assessing {model_set.view}"):
        scored, probs = assessor.score(item.key, item.prepared.image, item.net_spacing)
        scored_all.append(scored)
        if transductive:
            continue
        scored.judge(reference_fences(model_set, item.case.phase))
        if on_case is not None:
            on_case(Assessed(item, scored, probs))
    if transductive and scored_all:
        strategy = threshold_strategy(cfg)
        fences = fit_population_fences(scored_all, strategy, _phase, skip_unfittable=True)
        missing = {_phase(s) for s in scored_all} - set(fences)
        if missing:
            # a phase whose every case is penalised is judged with the pooled fences
            fences.update(
                {
                    p: fit_population_fences(scored_all, strategy, lambda s: "all")["all"]
                    for p in missing
                }
            )
        for item, scored in zip(cases, scored_all, strict=True):
            scored.judge(fences[_phase(scored)])
            if on_case is not None:
                on_case(
                    Assessed(item, scored, assessor.candidate_probabilities(item.prepared.image))
                )
    return scored_all


def reference_fences(model_set: ModelSet, phase: str) -> Any:
    """The reference fences of ``phase`` (pooled fences for a phase not calibrated)."""
    if phase in model_set.fences:
        return model_set.fences[phase]
    if "all" in model_set.fences:
        return model_set.fences["all"]
    raise CaseError(phase, "the run has no reference fences; use population: transductive")


def restore_labels(item: PreparedCase, probs: np.ndarray) -> np.ndarray:
    """A network-grid softmax map restored to the original grid, as labels ``(X, Y, Z)``."""
    return item.prepared.transform.restore_probabilities(probs).argmax(-1).astype(np.uint8)


def sources_for(
    data_dir: str | Path, views: Iterable[str], where: dict[str, Any] | None = None
) -> list[CaseSource]:
    """Discovered cases of ``views`` (optionally filtered by metadata)."""
    return [s for s in discover(data_dir, where=where) if s.view in set(views)]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    return json.loads(
        json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def copy_run_skeleton(src: Path, dst: Path, views: Sequence[str]) -> None:
    """Copy what a refined run shares with its parent: config, QC modules, fences and poses."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "config.yaml", dst / "config.yaml")
    for view in views:
        (dst / view).mkdir(parents=True, exist_ok=True)
        for name in ("qc.pt", "fences.json", "pose.json"):
            if (src / view / name).exists():
                shutil.copy2(src / view / name, dst / view / name)


def refine_run(
    data_dir: str | Path,
    run_dir: str | Path,
    out_run: str | Path,
    cfg: QcloopConfig | None = None,
    *,
    labelled_dir: str | Path | None = None,
    views: Sequence[str] | None = None,
    where: dict[str, Any] | None = None,
    assessed_by_view: dict[str, tuple[int, list[Assessed]]] | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Refine every candidate on the OoD cases of ``data_dir``; save the refined set in
    ``out_run`` beside (never over) ``run_dir``.

    ``assessed_by_view`` reuses assessments of ``data_dir`` already made with ``run_dir`` (see
    :func:`refine_view`). With a tracker (``tracker``, else the configured one) this is one
    tracked run with a nested run per view: the refiner's per-epoch loss and OoD count per
    candidate, OoD before and after, and ``run.json``."""
    run, out = Path(run_dir), Path(out_run)
    if out.resolve() == run.resolve():
        raise ValueError(f"{out}: refined models go beside the original run, not over it")
    cfg = cfg or load_run_config(run)
    parent = read_run_info(run)
    views = [v for v in (views or run_views(run))]
    labelled_dir = labelled_dir or parent.get("data")
    copy_run_skeleton(run, out, views)
    info: dict[str, Any] = {
        "qcloop_version": __version__,
        "kind": "refined",
        "created": _now(),
        "data": parent.get("data"),
        "parent": str(run.resolve()),
        "refined_on": str(Path(data_dir).resolve()),
        "views": {},
    }
    tracker = tracker if tracker is not None else make_tracker(cfg)
    run_tags = {
        "qcloop.kind": "refine",
        "qcloop.run_dir": str(out.resolve()),
        "qcloop.parent_run": str(run.resolve()),
    }
    with tracker.start_run(f"refine {out.name}", tags=run_tags):
        tracker.log_params(
            {
                "data_window": info["refined_on"],
                "parent": info["parent"],
                "refiner": cfg.refinement.refiner.name,
                "refiner_params": dict(cfg.refinement.refiner.params),
                "k_semi": cfg.refinement.k_semi,
                "where": json.dumps(where or {}, sort_keys=True),
            }
        )
        for view in views:
            with tracker.start_run(f"refine {out.name} {view}", tags={"qcloop.view": view}):
                info["views"][view] = result = refine_view(
                    view,
                    run,
                    out,
                    cfg,
                    data_dir,
                    labelled_dir,
                    where,
                    (assessed_by_view or {}).get(view),
                )
                _log_refinement(tracker, result)
        atomic.write_json(out / "run.json", info)
        _log_file(tracker, out / "run.json")
    return info


def _log_refinement(tracker: Tracker, result: dict[str, Any]) -> None:
    """A view's refinement as metrics: window counts, and per candidate the numbers of each
    epoch (``c<i>.loss``, ``c<i>.ood``, ``c<i>.skipped_cases`` as a count...) with
    ``c<i>.ood_before`` / ``c<i>.ood_after``."""
    tracker.log_metrics(
        {"window_cases": float(result["cases"]), "window_ood": float(result["flagged"])}
    )
    for i, h in enumerate(result.get("history") or []):
        for e in h.get("epochs") or []:
            step = int(e.get("epoch", 0))
            metrics = {}
            for k, v in e.items():
                if isinstance(v, list | tuple):
                    v = len(v)
                if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool):
                    metrics[f"c{i}.{k}"] = float(v)
            tracker.log_metrics(metrics, step=step)
        before = h.get("ood_before")
        epochs = h.get("epochs") or []
        after = next((e["ood"] for e in reversed(epochs) if "ood" in e), before)
        if isinstance(before, int | float) and isinstance(after, int | float):
            tracker.log_metrics(
                {f"c{i}.ood_before": float(before), f"c{i}.ood_after": float(after)}
            )


def refine_view(
    view: str,
    run: Path,
    out: Path,
    cfg: QcloopConfig,
    data_dir: str | Path,
    labelled_dir: str | Path,
    where: dict[str, Any] | None = None,
    assessed: tuple[int, list[Assessed]] | None = None,
) -> dict[str, Any]:
    """Refine the candidates of one view on its flagged cases; write them under ``out/view``.

    ``assessed`` = (number of cases, flagged cases as kept by :func:`flag_collector`) reuses an
    assessment already made with this run instead of assessing ``data_dir`` again.
    """
    from qcloop.monitor.plugins import get_plugin_manager
    from qcloop.plugins.refiners import FlaggedSet

    rc = cfg.refinement.refiner
    model_set = load_model_set(run, view, cfg)
    pre = make_preprocessor(cfg, getattr(model_set.best, "divisor", 1))
    if assessed is None:
        flagged_items: list[Assessed] = []
        cases = load_prepared(sources_for(data_dir, [view], where), pre)
        n_cases = len(assess_prepared(model_set, cases, cfg, flag_collector(flagged_items)))
    else:
        n_cases, flagged_items = assessed
    flagged = FlaggedSet(
        images=[a.item.prepared.image for a in flagged_items],
        selected=[a.probs[0] for a in flagged_items],
    )
    train_src, _ = split_labelled(sources_for(labelled_dir, [view]), seed=cfg.seed)
    labelled = load_prepared(train_src, pre)
    slices = SliceSet.from_stacks(
        [c.prepared.image for c in labelled], [c.prepared.gt for c in labelled]
    )
    assessor = make_assessor(model_set, cfg)
    case_qc = CaseQC(assessor.reconstruct)
    fences = [a.scored.fences for a in flagged_items]

    def still_ood(model: Any) -> int:
        return count_still_ood(assessor, model, flagged_items, fences)

    refined, histories = [], []
    for i, candidate in enumerate(model_set.candidates):
        params = {"seed": cfg.seed + i, **rc.params}
        if rc.name == "alpha":
            params.setdefault("k_semi", cfg.refinement.k_semi)
        refiner = get_plugin_manager().refiners().create(rc.name, params)
        model = copy.deepcopy(candidate)
        histories.append(refiner.refine(model, case_qc, flagged, slices, still_ood))
        refined.append(model)
    entries = [
        {**e, "path": f"candidates/refined-{i}.pt", "parent_path": e["path"]}
        for i, e in enumerate(model_set.candidate_info)
    ]
    save_candidates(out / view, refined, entries)
    log.info(
        "%s: refined %d candidate(s) on %d flagged of %d cases",
        view,
        len(refined),
        len(flagged_items),
        n_cases,
    )
    return {
        "cases": n_cases,
        "flagged": len(flagged_items),
        "refiner": rc.name,
        "flagged_keys": [f"{a.item.case.key}" for a in flagged_items],
        "history": _jsonable(histories),
    }


@dataclass(frozen=True)
class CaseQC:
    """The QC module as refiners see it: ``reconstruct`` of one case's softmax maps
    ``(Z, C, S, S)``, in the reference pose when pose normalisation is on."""

    reconstruct: Callable[[np.ndarray], np.ndarray]


def flag_collector(flagged: list[Assessed]) -> CaseCallback:
    """A case callback that keeps each OoD case with its QC-selected map (what refiners need)."""

    def keep(a: Assessed) -> None:
        if a.scored.ood:
            flagged.append(Assessed(a.item, a.scored, [_selected(a).astype(np.float32)]))

    return keep


def _selected(a: Assessed) -> np.ndarray:
    from qcloop.monitor.assessment import selected_probabilities

    return selected_probabilities(a.scored, a.probs)


def count_still_ood(
    assessor: Assessor, model: Any, flagged: Sequence[Assessed], fences: Sequence[Any]
) -> int:
    """How many flagged cases one candidate still leaves outside its fences."""
    from qcloop.monitor.assessment import STRUCTURE_NAMES, decision_value, pseudo_metrics
    from qcloop.monitor.training import predict_probabilities

    # only the decision structure matters here: skip the other structures' distances
    decision = assessor.decision_structure
    structures = STRUCTURE_NAMES if decision == "mean" else (decision,)
    n = 0
    for a, f in zip(flagged, fences, strict=True):
        probs = predict_probabilities(model, a.item.prepared.image)
        recon = assessor.reconstruct(probs)
        scores = pseudo_metrics(
            probs.argmax(1),
            recon.argmax(1),
            a.item.net_spacing,
            voxel_units=assessor.voxel_units,
            structures=structures,
        )
        pdc, phd, _ = decision_value(scores, assessor.decision_structure)
        n += int(f.is_outlier(pdc, phd))
    return n


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
) -> dict[str, Any]:
    """Assess (and with ``write_masks`` predict) every case of ``data_dir`` with a run.

    ``run_dir`` is one run folder, or a mapping view -> run folder (registered versions of
    each view resolved from the registry live in separate folders); ``model_info`` adds a
    ``model`` field (e.g. registered name and version) to each view's records.

    Writes ``out_dir/records.jsonl`` (one JSON record per case, in case order) and
    ``out_dir/summary.json``; with ``write_masks`` the QC-selected masks go to
    ``out_dir/masks/<subject>_<view>_<phase>_pred.nii.gz`` on the original grid with the
    original affine and header. Bad cases are reported in the summary and skipped.

    With a tracker (``tracker``, else the run's configured one) the assessment is one tracked
    run: per view the case and OoD counts and the OoD fraction, and ``summary.json``.
    """
    from qcloop.monitor.data import save_label_map
    from qcloop.monitor.plugins import get_plugin_manager

    pm = get_plugin_manager()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(run_dir, Mapping):
        runs = {v: Path(r) for v, r in run_dir.items() if views is None or v in views}
        if not runs:
            raise RunError(f"no run folder for the views {list(views or [])}")
    else:
        one = Path(run_dir)
        runs = {v: one for v in (views or run_views(one))}
    views = list(runs)
    run = next(iter(runs.values()))
    cfg = load_run_config(run)
    all_sources = discover(data_dir, where=where)
    records: list[dict[str, Any]] = []
    errors: list[CaseError] = []
    per_view: dict[str, Any] = {}
    for view in views:
        view_cfg = load_run_config(runs[view]) if runs[view] != run else cfg
        model_set = load_model_set(runs[view], view, view_cfg)
        info = {"run": str(runs[view].resolve()), **dict((model_info or {}).get(view, {}))}
        pre = make_preprocessor(view_cfg, getattr(model_set.best, "divisor", 1))
        cases = load_prepared([s for s in all_sources if s.view == view], pre, errors)

        def emit(a: Assessed, info: dict[str, Any] = info) -> None:
            rec = a.scored.to_record()
            rec["model"] = info
            labels = None
            if a.item.case.gt is not None or write_masks:
                labels = restore_labels(a.item, _selected(a))
            if a.item.case.gt is not None:
                rec["true_selected"] = {
                    s: {"dice": v.dice, "hd_mm": v.hd}
                    for s, v in compute_true(labels, a.item.case).items()
                }
            if write_masks:
                src = a.item.case.source
                path = out / "masks" / f"{src.subject}_{src.view}_{src.phase}_pred.nii.gz"
                save_label_map(path, labels, a.item.case)
                rec["mask"] = str(path)
            records.append(rec)
            pm.notify_case_scored(rec)  # one broadcast per case, after the work is done

        scored = assess_prepared(model_set, cases, view_cfg, emit)
        per_view[view] = {
            "cases": len(scored),
            "ood": sum(bool(s.ood) for s in scored),
            "population": population(view_cfg),
        }
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
    run_tags = {"qcloop.kind": "assess", "qcloop.run_dir": str(run.resolve())}
    with tracker.start_run(f"assess {out.name}", tags=run_tags):
        tracker.log_params(
            {"data": summary["data"], "run": summary["run"], "write_masks": write_masks}
        )
        metrics = {"cases": float(summary["cases"]), "ood": float(summary["ood"])}
        metrics["skipped"] = float(len(errors))
        for view, d in per_view.items():
            metrics[f"{view}.cases"] = float(d["cases"])
            metrics[f"{view}.ood"] = float(d["ood"])
            if d["cases"]:
                metrics[f"{view}.ood_fraction"] = d["ood"] / d["cases"]
        tracker.log_metrics(metrics)
        _log_file(tracker, out / "summary.json")
    return summary


def compute_true(labels: np.ndarray, case: Case) -> dict[str, Any]:
    """True metrics of a restored prediction against the case's ground truth (original grid)."""
    from qcloop.monitor.metrics import compute_metrics

    return compute_metrics(labels, case.gt, case.spacing)
