"""`qcloop calibrate`: a model qcloop did not train, or masks another tool wrote, calibrated
against a QC run (``qcloop qc train``) on in-distribution reference cases.

The result is a run folder that ``assess``, ``predict``, ``monitor``, ``serve`` and
``models register`` accept like a trained run::

    RUN/run.json               kind "external" (a model card) or "masks" (no model), the card,
                               the model file's sha256, the QC run it came from
    RUN/config.yaml            the QC run's configuration (its grid is the QC module's)
    RUN/model/card.yaml        a copy of the card, ``path`` pointing at the copied model
    RUN/model/<model file>     the model file (or nnU-Net results folder), copied
    RUN/<VIEW>/candidates.json one entry naming ``../model/card.yaml`` (kind "external" only)
    RUN/<VIEW>/qc.pt, pose.json, training/qc_history.json   copied from the QC run
    RUN/<VIEW>/fences.json     fitted on the model's (or the masks') QC scores

Ground truth is not needed: the fences come from the QC module's estimates alone. The folder is
staged under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from qcloop.monitor import __version__
from qcloop.monitor.core import atomic
from qcloop.monitor.core.config import dump_config
from qcloop.monitor.core.interfaces import Tracker
from qcloop.monitor.core.serialise import utc_now
from qcloop.monitor.core.tracking import NullTracker
from qcloop.monitor.method.assessment import ScoredCase
from qcloop.monitor.method.cases import RECORD_KEY_FIELDS
from qcloop.monitor.method.fences_file import save_reference_fences
from qcloop.monitor.method.qc_train import qc_views, staged_folder
from qcloop.monitor.method.run_folder import RunError, load_run_config
from qcloop.monitor.method.train import fit_reference_fences

log = logging.getLogger(__name__)

EXTERNAL_RUN_KIND = "external"
MASKS_RUN_KIND = "masks"
MODEL_DIR = "model"
CARD_FILE = "card.yaml"
#: What a view folder of the QC run contributes (the rest is the QC run's own business).
_QC_FILES = ("qc.pt", "pose.json", "training/qc_history.json")


def calibrate_model(
    qc_run: str | Path,
    card_path: str | Path,
    data_dir: str | Path,
    out: str | Path,
    *,
    views: Sequence[str] | None = None,
    where: dict[str, Any] | None = None,
    tracker: Tracker | None = None,
    engine_name: str = "local",
    engine_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the card's model on the reference cases of ``data_dir`` (a folder, glob or case
    list; ``where``: a metadata filter), score each prediction with the QC run's module, fit
    the configured fences, and write the run folder ``out``. Returns its ``run.json``.

    ``engine_name`` picks the batch engine that scores the cases (``local``, ``ray``: its
    actors read the card and the QC module from the folder being written, so ``out`` must be
    on storage they share); the fences do not depend on it."""
    from qcloop.monitor.core.model_card import load_card
    from qcloop.monitor.core.plugin_manager import get_plugin_manager
    from qcloop.monitor.method.external import load_card_model

    qc_run, out = Path(qc_run), Path(out)
    cfg = load_run_config(qc_run)
    card = load_card(card_path)
    load_card_model(card).check()  # a model that rejects its input fails before any case
    chosen = _views(qc_run, views, card.views)
    tracker = tracker if tracker is not None else NullTracker()
    info = _run_info(EXTERNAL_RUN_KIND, qc_run, data_dir, where)
    # the card's model runs in process (its kind picks its runtime: onnxruntime for onnx);
    # the onnxruntime *runtime* serves qcloop's own exported candidates only
    cfg = cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"runtime": "torch"})})
    factory = get_plugin_manager().engines()[engine_name].factory
    with staged_folder(out) as stage, factory(**dict(engine_params or {})) as engine:
        atomic.write_text(stage / "config.yaml", dump_config(cfg))
        info["model"] = copy_model(card, stage / MODEL_DIR)
        info["card"] = card.to_dict()
        for view in chosen:
            _copy_qc(qc_run, stage, view)
            atomic.write_json(stage / view / "candidates.json", [_card_entry(info["model"])])
            scored, errors = _score_reference(stage, view, data_dir, where, engine)
            fences = fit_reference_fences(scored, view, cfg, tracker=tracker)
            save_reference_fences(stage / view, fences)
            info["views"][view] = _view_info(scored, errors, fences)
        atomic.write_json(stage / "run.json", info)
    log.info("calibrated %s (%s) into %s: %s", card_path, card.kind, out, chosen)
    return info


def calibrate_masks(
    qc_run: str | Path,
    data_dir: str | Path,
    masks: str | Path,
    out: str | Path,
    *,
    mapping_csv: str | Path | None = None,
    label_map: str | None = None,
    views: Sequence[str] | None = None,
    where: dict[str, Any] | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Fit fences on masks another tool wrote for the reference cases of ``data_dir`` (matched
    as ``assess --predictions`` matches them) and write the run folder ``out`` (kind
    ``masks``: QC modules and fences, no model). Returns its ``run.json``."""
    from qcloop.monitor.method.predictions import scored_masks

    qc_run, out = Path(qc_run), Path(out)
    cfg = load_run_config(qc_run)
    chosen = _views(qc_run, views, None)
    info = _run_info(MASKS_RUN_KIND, qc_run, data_dir, where)
    info["masks"] = str(Path(masks).resolve())
    with staged_folder(out) as stage:
        shutil.copy2(qc_run / "config.yaml", stage / "config.yaml")
        for view in chosen:
            _copy_qc(qc_run, stage, view)
            scored, errors = scored_masks(
                stage,
                data_dir,
                masks,
                cfg,
                views=[view],
                mapping_csv=mapping_csv,
                label_map=label_map,
                where=where,
                judge=False,
            )
            if not scored:
                raise RunError(f"{view}: no mask could be scored ({len(errors)} error(s))")
            fences = fit_reference_fences(scored, view, cfg, tracker=tracker)
            save_reference_fences(stage / view, fences)
            info["views"][view] = _view_info(scored, errors, fences)
        atomic.write_json(stage / "run.json", info)
    return info


def copy_model(card: Any, model_dir: Path) -> dict[str, str]:
    """Copy the card's model file (or folder) into ``model_dir`` beside a copy of the card
    whose ``path`` names the copy; the copied file's name and sha256."""
    source = card.resolved_path
    model_dir.mkdir(parents=True)
    target = model_dir / source.name
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)
    data = {**card.to_dict(), "path": source.name}
    atomic.write_text(model_dir / CARD_FILE, yaml.safe_dump(data, sort_keys=False))
    return {"file": f"{MODEL_DIR}/{source.name}", "sha256": file_sha256(target)}


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _views(
    qc_run: Path, requested: Sequence[str] | None, card_views: Sequence[str] | None
) -> list[str]:
    """The views to calibrate: requested (else the card's, else the QC run's), each needing a
    QC module in the QC run and, with a card, being one the card segments."""
    available = qc_views(qc_run)
    chosen = list(requested or card_views or available)
    for view in chosen:
        if card_views is not None and view not in card_views:
            raise RunError(f"the model card segments {list(card_views)}, not {view}")
        if view not in available:
            raise RunError(f"{qc_run}: no QC module for view {view} (has {available})")
    if not chosen:
        raise RunError(f"{qc_run}: holds no QC module (train one with qcloop qc train)")
    return chosen


def _copy_qc(qc_run: Path, stage: Path, view: str) -> None:
    """Copy the QC module, its pose reference and its history of ``view``."""
    for name in _QC_FILES:
        source = qc_run / view / name
        if source.exists():
            (stage / view / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, stage / view / name)


def _card_entry(model: dict[str, str]) -> dict[str, Any]:
    """The one ``candidates.json`` entry of a calibrated model."""
    return {"card": f"../{MODEL_DIR}/{CARD_FILE}", "sha256": model["sha256"], "epoch": -1}


def _score_reference(
    stage: Path, view: str, data_dir: str | Path, where: dict[str, Any] | None, engine: Any
) -> tuple[list[ScoredCase], list[str]]:
    """The reference cases of ``view`` scored (not judged) by the model set in ``stage``, and
    the reasons of those that failed."""
    from qcloop.monitor.data.case_list import find_cases
    from qcloop.monitor.method.case_worker import ViewJob

    sources = [s for s in find_cases(data_dir, where=where) if s.view == view]
    scored: list[ScoredCase] = []
    errors: list[str] = []
    job = ViewJob(view, stage, stage, judge=False)
    for kind, payload in engine.outcomes(job, sources):
        if kind == "record":
            scored.append(ScoredCase.from_record(payload, RECORD_KEY_FIELDS))
        else:
            errors.append(f"{payload['path']}: {payload['reason']}")
    if not scored:
        raise RunError(f"{data_dir}: no usable {view} reference case ({len(errors)} failed)")
    return scored, errors


def _run_info(
    kind: str, qc_run: Path, data_dir: str | Path, where: dict[str, Any] | None
) -> dict[str, Any]:
    """The common part of a calibrated run's ``run.json``."""
    return {
        "qcloop_version": __version__,
        "kind": kind,
        "created": utc_now(),
        "qc_run": str(qc_run.resolve()),
        "data": str(Path(data_dir).resolve()),
        "where": where or {},
        "views": {},
        "parent": None,
    }


def _view_info(cases: Sequence[Any], errors: Sequence[Any], fences: Any) -> dict[str, Any]:
    """What ``run.json`` says of one calibrated view."""
    return {
        "reference_cases": len(cases),
        "skipped": [str(e) for e in errors],  # "path: reason", as CaseError prints
        "fences": {
            k: {"pdc_low": f.pdc_low, "phd_high": f.phd_high} for k, f in fences.phases.items()
        },
        "reference": fences.reference,
    }
