"""The QC module's training on ground-truth masks, shared by ``qcloop train`` (beside the
candidates) and ``qcloop qc train`` (a run folder holding QC modules only, for a segmenter that
qcloop did not train); and the QC part of a run folder read back without candidates."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcloop.monitor import __version__
from qcloop.monitor.core import atomic
from qcloop.monitor.core.config import QcloopConfig, dump_config
from qcloop.monitor.core.interfaces import Tracker
from qcloop.monitor.core.resolve import build_qc_module
from qcloop.monitor.core.serialise import jsonable, utc_now
from qcloop.monitor.core.slices import SliceSet
from qcloop.monitor.core.tracking import log_file, make_tracker, run_params
from qcloop.monitor.data import CaseError, CaseSource, discover
from qcloop.monitor.method.cases import (
    PreparedCase,
    load_prepared,
    make_preprocessor,
    split_labelled,
)
from qcloop.monitor.method.pose import POSE_FILE, PoseReference, load_pose
from qcloop.monitor.method.qc_call import needs_image
from qcloop.monitor.method.run_folder import (
    VIEWS,
    ModelSet,
    RunError,
    load_fences,
    qc_params,
)
from qcloop.monitor.method.segmenter_training import ValCase

log = logging.getLogger(__name__)

#: ``run.json`` kind of a run folder holding QC modules only.
QC_RUN_KIND = "qc"
QC_FILE = "qc.pt"


@dataclass
class LabelledView:
    """One view's labelled cases, split into training and validation and prepared for the
    network grid: what the QC module (and the segmenter) train on."""

    view: str
    train_cases: list[PreparedCase]
    val_cases: list[PreparedCase]
    slices: SliceSet
    val: list[ValCase]
    errors: list[CaseError] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Training cases, validation cases and training slices, as ``run.json`` records them."""
        return {
            "train_cases": len(self.train_cases),
            "val_cases": len(self.val),
            "train_slices": len(self.slices),
        }


def load_labelled_view(
    view: str,
    all_sources: Sequence[CaseSource],
    data_dir: str | Path,
    cfg: QcloopConfig,
    divisor: int = 1,
) -> LabelledView:
    """The labelled cases of ``view`` split (``split_labelled``) and prepared with the
    configuration's preprocessing; unreadable cases are skipped and kept in ``errors``."""
    sources = [s for s in all_sources if s.view == view]
    train_src, val_src = split_labelled(sources, seed=cfg.seed)
    if not train_src or not val_src:
        raise CaseError(data_dir, f"no labelled {view} cases to train and validate on")
    pre = make_preprocessor(cfg, divisor)
    errors: list[CaseError] = []
    train_cases = load_prepared(train_src, pre, errors)
    val_cases = load_prepared(val_src, pre, errors)
    slices = SliceSet.from_stacks(
        [c.prepared.image for c in train_cases], [c.prepared.gt for c in train_cases]
    )
    val = [ValCase(c.prepared.image, c.prepared.gt) for c in val_cases]
    return LabelledView(view, train_cases, val_cases, slices, val, errors)


def train_qc_module(
    data: LabelledView, view_dir: Path, cfg: QcloopConfig, tracker: Tracker
) -> None:
    """Train the QC module on the view's ground-truth masks; write ``qc.pt``, the training
    masks' reference pose and the QC module's history (``training/qc_history.json``)."""
    view = data.view
    qc = build_qc_module(cfg.qc.module.name, qc_params(cfg, view, len(data.slices)))
    images: dict[str, np.ndarray] = {}
    if needs_image(qc):  # an image-aware module learns image-mask pairs
        images["images"] = data.slices.images[:, 0]
        images["val_images"] = np.concatenate([v.image for v in data.val])
    qc_history = qc.fit(
        data.slices.labels,
        np.concatenate([v.labels for v in data.val]),
        seed=cfg.seed,
        log=tracker.log_metrics,  # the QC module names its figures qc/...
        **images,
    )
    atomic.torch_save(qc.state_dict(), view_dir / QC_FILE)
    try:
        pose = PoseReference.from_ground_truth([c.prepared.gt for c in data.train_cases])
        atomic.write_json(view_dir / POSE_FILE, pose.to_dict())
    except ValueError as exc:
        log.warning("%s: no reference pose recorded: %s", view, exc)
    atomic.write_json(view_dir / "training" / "qc_history.json", jsonable(qc_history))


def train_qc_run(
    data_dir: str | Path,
    run_dir: str | Path,
    cfg: QcloopConfig,
    views: Sequence[str] | None = None,
    *,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Train the QC module of each view on the labelled cases of ``data_dir`` alone, into a new
    run folder holding no candidates and no fences (``kind: "qc"`` in ``run.json``).

    The folder is written beside ``run_dir`` under a temporary name and renamed into place when
    complete, so a crash never leaves a partial run; ``run_dir`` must not exist or be empty.
    With a tracker (``tracker``, else ``tracking.tracker`` of ``cfg``) this is one tracked run
    with a nested run per view. Returns ``run.json``'s content.
    """
    run = Path(run_dir)
    views = list(views or cfg.views)
    tracker = tracker if tracker is not None else make_tracker(cfg)
    all_sources = discover(data_dir)
    info: dict[str, Any] = {
        "qcloop_version": __version__,
        "kind": QC_RUN_KIND,
        "created": utc_now(),
        "data": str(Path(data_dir).resolve()),
        "views": {},
        "parent": None,
    }
    run_tags = {"qcloop.kind": "qc-train", "qcloop.run_dir": str(run.resolve())}
    with staged_folder(run) as stage, tracker.start_run(f"qc train {run.name}", tags=run_tags):
        atomic.write_text(stage / "config.yaml", dump_config(cfg))
        tracker.log_params(run_params(cfg, info["data"], views))
        log_file(tracker, stage / "config.yaml")
        for view in views:
            with tracker.start_run(f"qc train {run.name} {view}", tags={"qcloop.view": view}):
                data = load_labelled_view(view, all_sources, data_dir, cfg)
                log.info(
                    "%s: training the QC module on %d masks (%d cases), validating on %d cases",
                    view,
                    len(data.slices),
                    len(data.train_cases),
                    len(data.val),
                )
                tracker.log_params({"view": view, **data.counts})
                train_qc_module(data, stage / view, cfg, tracker)
                log_file(tracker, stage / view / "training" / "qc_history.json", f"{view}/training")
                info["views"][view] = {**data.counts, "skipped": [str(e) for e in data.errors]}
        atomic.write_json(stage / "run.json", info)
        log_file(tracker, stage / "run.json")
    return info


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A new temporary folder beside ``target`` that becomes ``target`` when the block
    completes, and is removed when it raises; ``RunError`` when ``target`` holds anything."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RunError(f"{target}: already exists and is not empty; choose a new run folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield stage
        os.chmod(stage, 0o755)  # mkdtemp makes it private; a run folder is an ordinary folder
        if target.exists():
            target.rmdir()  # empty (checked above); a folder cannot be renamed over another
        os.replace(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def qc_views(run: str | Path) -> list[str]:
    """Views with a QC module in ``run`` (a trained, refined or QC-only run folder)."""
    return [v for v in VIEWS if (Path(run) / v / QC_FILE).exists()]


def load_qc_set(run: str | Path, view: str, cfg: QcloopConfig, *, fences: bool = True) -> ModelSet:
    """The QC module, reference pose and (with ``fences``, when calibrated) fences of ``view``
    as a model set without candidates: what scoring masks made elsewhere needs."""
    path = Path(run) / view / QC_FILE
    if not path.exists():
        raise RunError(f"{path}: missing - does {run} hold a QC module for view {view}?")
    qc = build_qc_module(cfg.qc.module.name, qc_params(cfg, view))
    try:
        qc.load_state_dict(torch.load(path, weights_only=True))
    except Exception as exc:
        raise RunError(f"{path}: cannot load the QC module ({exc})") from exc
    return ModelSet(
        view=view,
        candidates=[],
        candidate_info=[],
        qc=qc,
        fences=load_fences(run, view) if fences else {},
        pose=load_pose(run, view),
    )
