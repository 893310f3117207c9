"""The per-case work of ``assess`` and ``predict``, the same in every engine: load and prepare a
case, score it with every candidate and the QC module, judge it against the run's reference
fences, and turn it into its record (true scores where ground truth exists, the QC-selected
mask and the QC figure written where asked, each write then rename).

A :class:`ViewScorer` holds one view's loaded model set: an engine builds one per worker (the
local engine one per view, the Ray engine one per actor) and calls :meth:`ViewScorer.score` per
case. A case that cannot be read or scored is a ``skipped`` outcome with its reason; it never
costs another case.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qcloop.monitor.core import atomic
from qcloop.monitor.data import CaseError, CaseSource, load_case
from qcloop.monitor.method.cases import (
    PreparedCase,
    compute_true,
    make_preprocessor,
    restore_labels,
)
from qcloop.monitor.method.quality_estimate import Estimator, load_estimator
from qcloop.monitor.method.run_folder import RunError, load_model_set, load_run_config
from qcloop.monitor.report.case_figure import case_figure_png, wants_figure

log = logging.getLogger(__name__)

#: ``("record", record)`` for a scored case, ``("skipped", {"path", "reason"})`` otherwise.
Outcome = tuple[Literal["record", "skipped"], dict[str, Any]]


@dataclass(frozen=True)
class ViewJob:
    """What every worker of one view needs to know (small and picklable: engines ship it).

    Attributes:
        view: ``"SA"`` or ``"LA"``.
        run: the run folder holding the view's model set.
        out: the output folder (``masks/`` and ``figures/`` go below it).
        model: the records' ``model`` field (the run, and a registered name and version).
        write_masks: write each QC-selected mask (``predict``).
        figures: ``flagged``, ``all`` or ``none``: the cases whose QC figure is drawn.
        judge: judge each case against the run's reference fences; ``False`` scores only (the
            record has the candidates' pDC/pHD and no verdict: calibration, which is about to
            fit those fences).
        store: an output folder by URI (``s3://bucket/qc``, :mod:`~qcloop.monitor.core.object_store`):
            masks and figures are written below ``out`` (then a local scratch folder), copied
            there and removed locally; records name them by URI.
        estimate_flags: with ``assessment.flag_on: est``, the run's estimator flags the cases
            (and must exist); ``False`` leaves the flag to the fences (``qcloop fit-estimator``,
            which scores the cases the estimator is about to be fitted on).
    """

    view: str
    run: Path
    out: Path
    model: dict[str, Any] = field(default_factory=dict)
    write_masks: bool = False
    figures: str = "none"
    judge: bool = True
    store: str | None = None
    estimate_flags: bool = True


@dataclass
class Assessed:
    """A scored and judged case, with its candidates' probabilities while they are needed."""

    item: PreparedCase
    scored: Any  # ScoredCase
    probs: list[np.ndarray] = field(default_factory=list)


def selected_map(a: Assessed) -> np.ndarray:
    """The QC-selected softmax map of a judged case."""
    from qcloop.monitor.method.assessment import selected_probabilities

    return selected_probabilities(a.scored, a.probs)


def check_job(job: ViewJob) -> Any:
    """The run's configuration, after checking that its view can be judged case by case
    (reference fences); a :class:`RunError` otherwise. Cheap: engines call it before starting
    workers."""
    from qcloop.monitor.method.run_folder import load_fences

    cfg = load_run_config(job.run)
    if not job.judge:
        if not (job.run / job.view / "candidates.json").is_file():
            raise RunError(f"{job.run}: no model set for the view {job.view}")
        return cfg
    if cfg.assessment.population == "transductive":
        raise RunError(
            f"{job.run}: transductive fences need the whole population before any case is "
            "judged; this engine judges case by case (use the local engine)"
        )
    if not (job.run / job.view / "candidates.json").is_file():
        raise RunError(f"{job.run}: no model set for the view {job.view}")
    if not load_fences(job.run, job.view):
        raise RunError(
            f"{job.run}: the run has no reference fences for {job.view}; use population: "
            "transductive (local engine) or calibrate the run"
        )
    return cfg


class ViewScorer:
    """One view's model set, loaded once, scoring cases one by one against reference fences."""

    def __init__(self, job: ViewJob, device: str | None = None) -> None:
        from qcloop.monitor.method.assess import make_assessor

        self.job = job
        cfg = check_job(job)
        self.model_set = load_model_set(job.run, job.view, cfg, fences=job.judge)
        if device is not None:
            _to_device(self.model_set, device)
        self.preprocessor = make_preprocessor(cfg, getattr(self.model_set.best, "divisor", 1))
        self.assessor = make_assessor(self.model_set, cfg)
        #: the run's calibrated estimate of this view, read once (None: the run has none)
        rule = cfg.assessment if job.estimate_flags else None
        self.estimator = load_estimator(job.run, job.view, rule) if job.judge else None

    def score(self, source: CaseSource) -> Outcome:
        """The outcome of one case; any failure is a ``skipped`` outcome naming its reason."""
        from qcloop.monitor.method.assess import reference_fences

        try:
            case = load_case(source)
            item = PreparedCase(case, self.preprocessor.prepare(case))
            scored, probs = self.assessor.score(
                item.key, item.prepared.image, item.net_spacing, item.origin
            )
            if not self.job.judge:
                rec = {**scored.to_record(), "spacing": list(scored.spacing)}
                return "record", {**rec, "model": dict(self.job.model)}
            scored.judge(reference_fences(self.model_set, case.phase))
            rec = case_record(
                Assessed(item, scored, probs), self.job, self.assessor.reconstruct, self.estimator
            )
        except CaseError as exc:
            log.warning("skipping %s: %s", source.key, exc)
            return "skipped", {"path": str(exc.path), "reason": exc.reason}
        except Exception as exc:  # the barrier: one case's failure is its own record
            log.exception("skipping %s", source.key)
            return "skipped", {
                "path": str(source.image_path),
                "reason": f"{type(exc).__name__}: {exc}",
            }
        return "record", rec


def _to_device(model_set: Any, device: str) -> None:
    """Move the torch candidates and the QC module of ``model_set`` to ``device``."""
    import torch

    for m in model_set.candidates:
        if isinstance(m, torch.nn.Module):
            m.to(device)
    qc = model_set.qc
    if isinstance(qc, torch.nn.Module):
        qc.to(device)
    if isinstance(getattr(qc, "net", None), torch.nn.Module):  # the built-in QC modules
        qc.net.to(device)
    if hasattr(qc, "device"):
        qc.device = device


def case_record(
    a: Assessed,
    job: ViewJob,
    reconstruct: Callable[..., np.ndarray] | None = None,
    estimator: Estimator | None = None,
) -> dict[str, Any]:
    """The record of one assessed case, with its calibrated estimate (``estimator``, the run's
    :func:`~qcloop.monitor.method.quality_estimate.load_estimator`), its true scores where ground truth exists, its mask written with ``job.write_masks`` and its figure where ``job.figures`` asks."""
    from qcloop.monitor.data import save_label_map

    rec = a.scored.to_record()
    rec["model"] = dict(job.model)
    if estimator is not None:
        estimator.apply(rec)  # with assessment.flag_on: est, it also flags the case
        a.scored.ood = rec["ood"]
    labels = None
    if a.item.case.gt is not None or job.write_masks:
        labels = restore_labels(a.item, selected_map(a))
    if a.item.case.gt is not None:
        rec["true_selected"] = {
            s: {"dice": v.dice, "hd_mm": v.hd} for s, v in compute_true(labels, a.item.case).items()
        }
    if job.write_masks:
        src = a.item.case.source
        path = job.out / "masks" / f"{src.subject}_{src.view}_{src.phase}_pred.nii.gz"
        save_label_map(path, labels, a.item.case)
        rec["mask"] = _published(path, job)
    if reconstruct is not None and wants_figure(job.figures, rec.get("ood")):
        _figure(a, rec, job.out, reconstruct)
        if "figure" in rec:
            rec["figure"] = _published(Path(rec["figure"]), job)
    return rec


def _published(path: Path, job: ViewJob) -> str:
    """Where a written output lives for its readers: ``path``, or its copy in ``job.store``."""
    if job.store is None:
        return str(path)
    from qcloop.monitor.core.object_store import open_store

    uri = open_store(job.store).put(path, path.relative_to(job.out).as_posix())
    path.unlink()
    return uri


def _figure(
    a: Assessed, rec: dict[str, Any], out: Path, reconstruct: Callable[..., np.ndarray]
) -> None:
    """Draw the case's QC figure into ``out/figures/``; a failure is recorded, never raised."""
    src = a.item.case.source
    path = out / "figures" / f"{src.subject}_{src.view}_{src.phase}.png"
    try:
        selected = selected_map(a)
        recon = reconstruct(selected, a.item.prepared.image).argmax(1)
        png = case_figure_png(a.item.prepared.image, selected.argmax(1), recon, rec)
        atomic.write_bytes(path, png)
    except Exception as exc:  # the record matters more than its picture
        log.warning("%s: no figure (%s)", src.image_path, exc)
        rec["figure_error"] = str(exc)
        return
    rec["figure"] = str(path)
