"""A model set: the candidate segmenters, the QC module and the reference fences of one view,
saved in a run folder.

Run folder layout::

    RUN/run.json                 qcloop version, views, lineage (parent run, refinement)
    RUN/config.yaml              the configuration the run was made with
    RUN/<VIEW>/candidates.json   kept checkpoints, best first (path, epoch, validation Dice)
    RUN/<VIEW>/candidates/*.pt   segmenter weights (tensors and plain values only)
    RUN/<VIEW>/qc.pt             QC module state
    RUN/<VIEW>/fences.json       reference fences per phase, their strategy and the reference
                                 median pDC (monitor/method/fences_file.py)
    RUN/<VIEW>/pose.json         reference pose of the training masks (monitor/pose.py)
    RUN/<VIEW>/training/last.pt  resumable training state

Everything is loaded with ``torch.load(weights_only=True)``: no pickle of arbitrary objects.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcloop.monitor.core import atomic
from qcloop.monitor.core.config import QcloopConfig, load_config
from qcloop.monitor.core.resolve import build_qc_module, build_segmenter
from qcloop.monitor.method.fences_file import (
    FENCES_FILE,
    FencesFileError,
    ReferenceFences,
    load_reference_fences,
)
from qcloop.monitor.method.pose import PoseReference, load_pose

log = logging.getLogger(__name__)

VIEWS = ("SA", "LA")


class RunError(Exception):
    """A run folder is missing, incomplete or inconsistent."""


@dataclass
class ModelSet:
    """Candidates, QC module and reference fences of one view."""

    view: str
    candidates: list[torch.nn.Module]
    candidate_info: list[dict[str, Any]]
    qc: Any
    fences: dict[str, Any] = field(default_factory=dict)
    pose: PoseReference | None = None

    @property
    def best(self) -> torch.nn.Module:
        """The single best checkpoint by validation Dice (configuration ``M``)."""
        return self.candidates[0]


def save_candidates(
    view_dir: Path, candidates: list[torch.nn.Module], info: list[dict[str, Any]]
) -> None:
    """Write candidate weights and ``candidates.json`` (best first) into ``view_dir``."""
    entries = []
    for i, (model, meta) in enumerate(zip(candidates, info, strict=True)):
        rel = meta.get("path") or f"candidates/candidate-{i}.pt"
        atomic.torch_save(
            {
                "state_dict": model.state_dict(),
                "epoch": int(meta.get("epoch", -1)),
                "val_dice": float(meta.get("val_dice", 0.0)),
                "meta": {k: v for k, v in meta.items() if k != "path"},
            },
            view_dir / rel,
        )
        entries.append({**meta, "path": rel})
    atomic.write_json(view_dir / "candidates.json", entries)


def load_model_set(
    run: str | Path, view: str, config: QcloopConfig | None = None, *, fences: bool = True
) -> ModelSet:
    """Load the model set of ``view`` from run folder ``run`` (without its fences when
    ``fences`` is false: training, which is about to calibrate new ones).

    A model set that judges cases (``fences``) must come from a complete run: ``run.json`` is
    written last, so a run whose training was killed between views is refused, never served
    half-made."""
    run = Path(run)
    view_dir = run / view
    if fences and (run / "config.yaml").exists() and not (run / "run.json").exists():
        raise RunError(
            f"{run}: incomplete run folder (no run.json): its training was interrupted; run "
            "qcloop train with the same --out again to resume it"
        )
    manifest = view_dir / "candidates.json"
    if not manifest.exists() and is_qc_only(run):
        raise qc_only_error(run)
    if not manifest.exists():
        raise RunError(f"{manifest}: missing - is {run} a trained qcloop run with view {view}?")
    cfg = config or load_run_config(run)
    entries = json.loads(manifest.read_text())
    if not entries:
        raise RunError(f"{manifest}: lists no candidates")
    candidates = [_load_candidate(view_dir, entry, cfg) for entry in entries]
    qc_path = view_dir / "qc.pt"
    if not qc_path.exists():
        raise RunError(f"{qc_path}: missing QC module")
    qc = build_qc_module(cfg.qc.module.name, qc_params(cfg, view))
    qc.load_state_dict(torch.load(qc_path, weights_only=True))
    return ModelSet(
        view=view,
        candidates=candidates,
        candidate_info=entries,
        qc=qc,
        fences=load_fences(run, view) if fences else {},
        pose=load_pose(run, view),
    )


def _load_candidate(view_dir: Path, entry: dict[str, Any], cfg: QcloopConfig) -> Any:
    """One candidate of ``candidates.json``: qcloop-trained weights (``path``), or a model qcloop
    did not train (``card``: a model card, written by ``qcloop calibrate``)."""
    if "card" in entry:
        from qcloop.monitor.method.external import load_card_model

        return load_card_model(view_dir / entry["card"])
    path = view_dir / entry["path"]
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:
        raise RunError(f"{path}: cannot load candidate weights ({exc})") from exc
    model = build_segmenter(cfg.segmenter.name, cfg.segmenter.params)
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model


def is_qc_only(run: str | Path) -> bool:
    """Whether ``run`` holds QC modules only (``qcloop qc train``: ``kind: "qc"``)."""
    try:
        return json.loads((Path(run) / "run.json").read_text()).get("kind") == "qc"
    except (OSError, ValueError, AttributeError):
        return False


def qc_only_error(run: str | Path) -> RunError:
    """The error for a QC-only run folder where candidates are needed."""
    return RunError(
        f"run folder {run} holds a QC module only (qcloop qc train); calibrate a model with "
        "qcloop calibrate --model CARD"
    )


def load_fences(run: str | Path, view: str) -> dict[str, Any]:
    """Reference fences of ``view`` per phase (``"all"`` pooled); empty when not calibrated."""
    fences = load_view_fences(run, view)
    return fences.phases if fences is not None else {}


def load_view_fences(run: str | Path, view: str) -> ReferenceFences | None:
    """``RUN/<view>/fences.json`` read back through the strategy that wrote it (``None`` when
    the view is not calibrated); ``RunError`` when it cannot be read."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    path = Path(run) / view / FENCES_FILE
    if not path.exists():
        return None
    try:
        return load_reference_fences(path, get_plugin_manager().threshold_strategies())
    except FencesFileError as exc:
        raise RunError(str(exc)) from None


def configured_pose(
    cfg: QcloopConfig, pose: PoseReference | None, view: str
) -> PoseReference | None:
    """The reference pose to normalise with: ``pose`` when ``assessment.pose_normalisation``
    is on (``RunError`` when the run has none), else ``None``."""
    if not cfg.assessment.pose_normalisation:
        return None
    if pose is None:
        raise RunError(
            f"{view}: assessment.pose_normalisation is on but the run has no {view}/pose.json "
            "(it was trained before qcloop recorded poses: retrain it, or switch the option off)"
        )
    return pose


def qc_params(cfg: QcloopConfig, view: str, n_masks: int | None = None) -> dict[str, Any]:
    """QC-module parameters with input size, input kind and schedule filled in from the config.

    With ``n_masks`` (the training-set size) the epochs are raised so that training runs at
    least ``qc.min_steps`` optimisation steps.
    """
    params = {
        "input_size": cfg.preprocessing.size,
        "input": cfg.qc.input,
        "epochs": cfg.qc.epochs,
        "batch_size": cfg.qc.batch_size,
    }
    if n_masks:
        steps_per_epoch = max(1, -(-n_masks // cfg.qc.batch_size))
        params["epochs"] = max(cfg.qc.epochs, -(-cfg.qc.min_steps // steps_per_epoch))
    params.update(cfg.qc.module.params)
    return params


def load_run_config(run: str | Path) -> QcloopConfig:
    """The configuration a run was made with."""
    path = Path(run) / "config.yaml"
    if not path.exists():
        raise RunError(f"{path}: missing - not a qcloop run folder")
    return load_config(path)


def read_run_info(run: str | Path) -> dict[str, Any]:
    """``run.json`` of a run folder."""
    path = Path(run) / "run.json"
    if not path.exists():
        raise RunError(f"{path}: missing - not a qcloop run folder")
    return json.loads(path.read_text())


def run_views(run: str | Path) -> list[str]:
    """Views with a model set in ``run``."""
    return [v for v in VIEWS if (Path(run) / v / "candidates.json").exists()]
