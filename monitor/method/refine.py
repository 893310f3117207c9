"""`qcloop refine`: every candidate fine-tuned on the flagged cases by the configured refiner,
saved as a new run folder beside its parent."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor import __version__
from qcloop.monitor.core import atomic
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.interfaces import Tracker
from qcloop.monitor.core.resolve import build_refiner
from qcloop.monitor.core.serialise import jsonable, utc_now
from qcloop.monitor.core.slices import FlaggedSet, SliceSet
from qcloop.monitor.core.tracking import log_file, make_tracker
from qcloop.monitor.method.assess import Assessed, assess_prepared, flag_collector, make_assessor
from qcloop.monitor.method.assessment import Assessor
from qcloop.monitor.method.cases import (
    Labelled,
    labelled_sources,
    load_prepared,
    make_preprocessor,
    sources_for,
)
from qcloop.monitor.method.external import load_card_model
from qcloop.monitor.method.qc_train import staged_folder
from qcloop.monitor.method.quality_estimate import load_estimator
from qcloop.monitor.method.run_folder import (
    RunError,
    load_model_set,
    load_run_config,
    read_run_info,
    run_views,
    save_candidates,
)
from qcloop.monitor.method.segmenter_training import predict_probabilities

log = logging.getLogger(__name__)


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
    extra_labelled: Sequence[str | Path] = (),
    views: Sequence[str] | None = None,
    where: dict[str, Any] | None = None,
    assessed_by_view: dict[str, tuple[int, list[Assessed]]] | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Refine every candidate on the OoD cases of ``data_dir``; save the refined set in
    ``out_run`` beside (never over) ``run_dir``.

    ``assessed_by_view`` reuses assessments of ``data_dir`` already made with ``run_dir`` (see
    :func:`refine_view`). The labelled anchor is the training split of ``labelled_dir`` (default:
    the run's training data) plus every case of the ``extra_labelled`` folders that exist
    (late ground truth: a monitor's ``OUT/labelled``). With a tracker (``tracker``, else the configured one) this is one
    tracked run with a nested run per view: the refiner's per-epoch loss and OoD count per
    candidate, OoD before and after, and ``run.json``."""
    run, out = Path(run_dir), Path(out_run)
    if out.resolve() == run.resolve():
        raise ValueError(f"{out}: refined models go beside the original run, not over it")
    cfg = cfg or load_run_config(run)
    parent = read_run_info(run)
    views = [v for v in (views or run_views(run))]
    card_run = refuse_card_runs(run, parent, views)
    labelled_dir = labelled_dir or default_labelled(parent)
    labelled = (labelled_dir, *(str(Path(d).resolve()) for d in extra_labelled if Path(d).is_dir()))
    info: dict[str, Any] = {
        "qcloop_version": __version__,
        "kind": "external" if card_run else "refined",
        "created": utc_now(),
        "data": parent.get("data"),
        "parent": str(run.resolve()),
        "refined_on": str(Path(data_dir).resolve()),
        "labelled": [str(d) for d in labelled if d is not None],
        "views": {},
    }
    tracker = tracker if tracker is not None else make_tracker(cfg)
    run_tags = {
        "qcloop.kind": "refine",
        "qcloop.run_dir": str(out.resolve()),
        "qcloop.parent_run": str(run.resolve()),
    }
    with staged_folder(out) as stage, tracker.start_run(f"refine {out.name}", tags=run_tags):
        # written into ``stage``, renamed ``out`` when complete: never a half-refined run
        copy_run_skeleton(run, stage, views)
        tracker.log_params(
            {
                "data_window": info["refined_on"],
                "parent": info["parent"],
                "refiner": cfg.refinement.refiner.name,
                "refiner_params": dict(cfg.refinement.refiner.params),
                "where": json.dumps(where or {}, sort_keys=True),
            }
        )
        refine_one = refine_view
        if card_run:
            from qcloop.monitor.method.refine_card import refine_card_view as refine_one
        for view in views:
            with tracker.start_run(f"refine {out.name} {view}", tags={"qcloop.view": view}):
                info["views"][view] = result = refine_one(
                    view,
                    run,
                    stage,
                    cfg,
                    data_dir,
                    labelled,
                    where,
                    (assessed_by_view or {}).get(view),
                )
                _log_refinement(tracker, result)
        if card_run:
            info.update({k: parent[k] for k in ("card", "qc_run") if k in parent})
        atomic.write_json(stage / "run.json", info)
        log_file(tracker, stage / "run.json")
    return info


def refuse_card_runs(run: Path, info: dict[str, Any], views: Sequence[str]) -> bool:
    """Whether ``run`` holds a model qcloop did not train (``qcloop calibrate``) that can be
    refined here (a trainable card on a fixed grid); ``RunError`` saying why for one that
    cannot: such a model is monitored, alerted on and served, but not refined."""
    kind = info.get("kind")
    if kind not in ("external", "masks"):
        return False
    if kind == "masks":
        raise RunError(
            f"{run}: calibrated on masks made elsewhere; there is no model here to refine"
        )
    from qcloop.monitor.method.refine_card import card_refinement_problem

    for view in views:
        entry = json.loads((run / view / "candidates.json").read_text())[0]
        predictor = load_card_model(run / view / entry["card"])
        problem = card_refinement_problem(predictor)
        if problem:
            raise RunError(
                f"{run}: cannot refine {view}: {problem}; monitoring, drift alerts and "
                "serving work as for a trained run"
            )
    return True


def default_labelled(info: dict[str, Any]) -> str | None:
    """The labelled data anchoring a refinement: a trained run's training data; a calibrated
    run's QC run's (its own ``data`` is the unlabelled reference set)."""
    qc_run = info.get("qc_run")
    if info.get("kind") == "external" and qc_run and Path(qc_run, "run.json").is_file():
        return read_run_info(Path(qc_run)).get("data")
    return info.get("data")


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
    labelled_dir: Labelled,
    where: dict[str, Any] | None = None,
    assessed: tuple[int, list[Assessed]] | None = None,
) -> dict[str, Any]:
    """Refine the candidates of one view on its flagged cases; write them under ``out/view``.

    ``assessed`` = (number of cases, flagged cases as kept by :func:`flag_collector`) reuses an
    assessment already made with this run instead of assessing ``data_dir`` again.
    """

    rc = cfg.refinement.refiner
    model_set = load_model_set(run, view, cfg)
    pre = make_preprocessor(cfg, getattr(model_set.best, "divisor", 1))
    estimator = load_estimator(run, view, cfg.assessment)
    n_cases, flagged_items = assessed or assess_window(
        model_set, cfg, data_dir, pre, where, estimator
    )
    flagged = FlaggedSet(
        images=[a.item.prepared.image for a in flagged_items],
        selected=[a.probs[0] for a in flagged_items],
    )
    train_src = labelled_sources(labelled_dir, view, cfg.seed)
    labelled = load_prepared(train_src, pre)
    slices = SliceSet.from_stacks(
        [c.prepared.image for c in labelled], [c.prepared.gt for c in labelled]
    )
    assessor = make_assessor(model_set, cfg)
    case_qc = CaseQC(assessor.reconstruct)
    fences = [a.scored.fences for a in flagged_items]

    def still_ood(model: Any) -> int:
        def probabilities(i: int) -> np.ndarray:
            return predict_probabilities(model, flagged_items[i].item.prepared.image)

        return count_still_ood(assessor, probabilities, flagged_items, fences)

    refined, histories = [], []
    for i, candidate in enumerate(model_set.candidates):
        refiner = build_refiner(cfg, seed=cfg.seed + i)
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
        "labelled_cases": len(train_src),
        "flagged_keys": [f"{a.item.case.key}" for a in flagged_items],
        "history": jsonable(histories),
    }


def assess_window(
    model_set: Any,
    cfg: QcloopConfig,
    data_dir: str | Path,
    pre: Any,
    where: dict[str, Any] | None,
    estimator: Any = None,
) -> tuple[int, list[Assessed]]:
    """Assess the cases of ``data_dir`` (prepared by ``pre``) with ``model_set``: how many,
    and the flagged ones as :func:`flag_collector` keeps them (by ``estimator`` when the run
    flags on the calibrated estimate)."""
    flagged: list[Assessed] = []
    cases = load_prepared(sources_for(data_dir, [model_set.view], where), pre)
    collect = flag_collector(flagged, estimator)
    return len(assess_prepared(model_set, cases, cfg, collect)), flagged


@dataclass(frozen=True)
class CaseQC:
    """The QC module as refiners see it: ``reconstruct(maps, image=None)`` of one case's softmax
    maps ``(Z, C, S, S)`` and prepared slices ``(Z, S, S)``, in the reference pose when pose
    normalisation is on."""

    reconstruct: Callable[..., np.ndarray]


def count_still_ood(
    assessor: Assessor,
    probabilities: Callable[[int], np.ndarray],
    flagged: Sequence[Assessed],
    fences: Sequence[Any],
) -> int:
    """How many flagged cases one candidate still leaves outside its fences;
    ``probabilities(i)`` is its softmax maps of flagged case ``i`` on the QC module's grid."""
    from qcloop.monitor.method.assessment import STRUCTURE_NAMES, decision_value, pseudo_metrics

    # only the decision structure matters here: skip the other structures' distances
    decision = assessor.decision_structure
    structures = STRUCTURE_NAMES if decision == "mean" else (decision,)
    n = 0
    for i, (a, f) in enumerate(zip(flagged, fences, strict=True)):
        probs = probabilities(i)
        recon = assessor.reconstruct(probs, a.item.prepared.image)
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
