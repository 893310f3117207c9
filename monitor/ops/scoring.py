"""Online scoring: one incoming case at a time, judged against the run's reference fences.

This is the per-case path shared by ``qcloop predict``-style services: ``qcloop monitor`` (an
inbox of incoming cases) and ``qcloop serve`` (an HTTP API). A registered ``Runtime`` runs the
networks (``torch``, built in; ``onnxruntime`` from the deploy plugin); the
:class:`OnlineScorer` does the rest: preprocessing, pDC/pHD, the OoD flag against the fences
calibrated at training time, QC-based selection, and the selected mask on the original grid.
Components are resolved once when the scorer is built; nothing per case goes through pluggy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.interfaces import Runtime
from qcloop.monitor.core.resolve import build_runtime
from qcloop.monitor.data import Case, CaseError
from qcloop.monitor.data.preprocess import Preprocessor
from qcloop.monitor.method.assessment import ScoredCase, pseudo_metrics, selected_probabilities
from qcloop.monitor.method.cases import make_preprocessor, record_key
from qcloop.monitor.method.pose import PoseReference, reconstruct_posed
from qcloop.monitor.method.qc_signals import case_signals

log = logging.getLogger(__name__)


@dataclass
class CaseResult:
    """What scoring one case produced."""

    #: the JSON record (same fields as ``qcloop assess`` records, plus runtime and latency).
    record: dict[str, Any]
    #: the QC-selected labels on the case's original grid, uint8 ``(X, Y, Z)``.
    labels: np.ndarray
    scored: ScoredCase
    timings_s: dict[str, float] = field(default_factory=dict)
    #: the prepared image ``(Z, S, S)`` and the selected softmax maps ``(Z, C, S, S)`` on the
    #: run's grid (references, no copies), for :meth:`OnlineScorer.figure_png`.
    prepared_image: np.ndarray | None = None
    selected: np.ndarray | None = None

    @property
    def ood(self) -> bool:
        """Whether the case was flagged out of distribution."""
        return bool(self.scored.ood)


class OnlineScorer:
    """Scores single cases of one view against the reference fences of a run.

    Args:
        view: ``"SA"`` or ``"LA"``.
        runtime: the networks of that view.
        fences: reference fences per phase (``"all"`` pooled), from the run's ``fences.json``.
        cfg: the run's configuration (preprocessing and assessment sections).
        model_info: identity of the models (run folder, registered name/version), copied into
            every record under ``"model"``.
        pose: the run's reference pose when ``assessment.pose_normalisation`` is on.
    """

    def __init__(
        self,
        view: str,
        runtime: Runtime,
        fences: dict[str, Any],
        cfg: QcloopConfig,
        model_info: dict[str, Any] | None = None,
        pose: PoseReference | None = None,
        estimator: Any = None,
    ) -> None:

        if not fences:
            raise ValueError(
                f"{view}: the run has no reference fences; online scoring needs them "
                "(train with qcloop train, which calibrates them)"
            )
        self.view = view
        self.runtime = runtime
        self.fences = fences
        self.cfg = cfg
        self.model_info = dict(model_info or {})
        self.pose = pose
        #: the run's calibrated estimate (quality_estimate.Estimator), or None
        self.estimator = estimator
        self.preprocessor: Preprocessor = make_preprocessor(cfg, runtime.divisor)
        self.decision_structure = cfg.assessment.decision_structure
        self.voxel_units = cfg.assessment.hd_units == "voxel"

    def fences_for(self, phase: str) -> Any:
        """Reference fences of ``phase``, else the pooled ones."""
        fences = self.fences.get(phase) or self.fences.get("all")
        if fences is None:
            raise CaseError(phase, f"no reference fences for phase {phase!r} nor pooled ones")
        return fences

    def score(self, case: Case) -> CaseResult:
        """Score, judge and select one loaded case; raises ``CaseError`` for an unusable case."""
        if case.view != self.view:
            raise CaseError(
                case.source.image_path, f"a {case.view} case given to the {self.view} scorer"
            )
        t0 = time.perf_counter()
        try:
            prepared = self.preprocessor.prepare(case)
        except ValueError as exc:
            raise CaseError(case.source.image_path, str(exc), key=case.key) from exc
        t1 = time.perf_counter()
        probs = self.runtime.segment(prepared.image, (case, prepared.transform))
        t2 = time.perf_counter()
        sx, sy, sz = prepared.spacing
        spacing = (sz, sx, sy)
        per_candidate = []
        net_labels = [p.argmax(1) for p in probs]
        for p, lab in zip(probs, net_labels, strict=True):
            recon = reconstruct_posed(self.runtime, p, self.pose, prepared.image)
            per_candidate.append(
                pseudo_metrics(lab, recon.argmax(1), spacing, voxel_units=self.voxel_units)
            )
        t3 = time.perf_counter()
        src = case.source
        scored = ScoredCase(
            key=record_key(src),
            spacing=spacing,
            candidates=per_candidate,
            decision_structure=self.decision_structure,
            extra={"signals": case_signals(probs, net_labels)},
        )
        scored.judge(self.fences_for(src.phase))
        selected = selected_probabilities(scored, probs)
        labels = prepared.transform.restore_probabilities(selected).argmax(-1).astype(np.uint8)
        t4 = time.perf_counter()
        timings = {
            "preprocess": t1 - t0,
            "segment": t2 - t1,
            "qc": t3 - t2,
            "select_restore": t4 - t3,
            "total": t4 - t0,
        }
        record = scored.to_record()
        if self.estimator is not None:
            self.estimator.apply(record)  # with assessment.flag_on: est, it also flags the case
            scored.ood = record["ood"]
        record["runtime"] = {"name": self.runtime.name, "providers": self.runtime.providers()}
        record["model"] = self.model_info
        record["latency_s"] = timings["total"]
        return CaseResult(record, labels, scored, timings, prepared.image, selected)

    def figure_png(self, result: CaseResult) -> bytes:
        """The case's QC figure (:mod:`~qcloop.monitor.report.case_figure`) as PNG bytes: one
        more QC reconstruction, of the selected maps; needs the ``report`` extra."""
        from qcloop.monitor.report.case_figure import case_figure_png

        if result.prepared_image is None or result.selected is None:
            raise ValueError("the result keeps no prepared image: it cannot be drawn")
        recon = reconstruct_posed(self.runtime, result.selected, self.pose, result.prepared_image)
        return case_figure_png(
            result.prepared_image, result.selected.argmax(1), recon.argmax(1), result.record
        )


def load_online_scorers(
    run_dir: str | Path,
    views: Sequence[str] | None = None,
    *,
    runtime: str = "torch",
    model_info: dict[str, Any] | None = None,
    **runtime_params: Any,
) -> dict[str, OnlineScorer]:
    """One :class:`OnlineScorer` per view of a run folder, on the registered runtime
    ``runtime`` (built with ``runtime_params``: ``threads``, the ONNX runtime's ``onnx_dir``,
    ...). Fences are read without building any network the runtime does not need."""
    from qcloop.monitor.method.pose import load_pose
    from qcloop.monitor.method.quality_estimate import load_estimator
    from qcloop.monitor.method.run_folder import (
        configured_pose,
        load_fences,
        load_run_config,
        run_views,
    )

    run = Path(run_dir)
    cfg = load_run_config(run)
    info = {"run": str(run.resolve()), **(model_info or {})}
    scorers = {}
    for view in views or run_views(run):
        rt = build_runtime(runtime, run, view, cfg, **runtime_params)
        pose = configured_pose(cfg, load_pose(run, view), view)
        estimator = load_estimator(run, view, cfg.assessment)
        scorers[view] = OnlineScorer(view, rt, load_fences(run, view), cfg, info, pose, estimator)
    if not scorers:
        raise CaseError(run, "the run has no trained view")
    return scorers
