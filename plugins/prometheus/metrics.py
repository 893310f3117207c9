"""The QC-drift metrics of one service, in their own Prometheus registry, updated from qcloop's
typed events.

A :class:`QcMetrics` owns its own ``CollectorRegistry`` (never the global one, so several
services can live in one process). Labels are view, structure, phase, runtime, stage and
source: never a case id, and never the model version on the case series (each refinement would
start a new set of series): the version serving each view is ``qcloop_model_info``, for the
monitor and serve alike.

========================================  =========  ==========================================
name (all prefixed ``qcloop_``)           type       labels (from which event)
========================================  =========  ==========================================
qcloop_pdc                                histogram  view, structure (scored)
qcloop_phd_mm                             histogram  view, structure (scored)
qcloop_est_dice                           histogram  view, structure (scored, when the run has
                                                     a calibrated estimate)
qcloop_cases_scored_total                 counter    view (scored)
qcloop_cases_flagged_total                counter    view (scored)
qcloop_model_info                         gauge      view, version, runtime: 1 for the models in use
                                                     (models loaded)
qcloop_model_reloads_total                counter    outcome (models loaded: ok on a swap,
                                                     failed on any failed load)
qcloop_case_errors_total                  counter    stage (case failed)
qcloop_ood_fraction                       gauge      view (window changed)
qcloop_window_cases                       gauge      view (window changed)
qcloop_pdc_window_median                  gauge      view (window changed)
qcloop_pdc_reference_median               gauge      view (window changed)
qcloop_fence_pdc_low                      gauge      view, phase (scored)
qcloop_fence_phd_high_mm                  gauge      view, phase (scored)
qcloop_case_latency_seconds               histogram  view, runtime (scored)
qcloop_drift_alerts_total                 counter    view, source (drift alert)
qcloop_refinements_total                  counter    view (refined)
qcloop_model_versions_registered_total    counter    name (registered)
qcloop_promotions_total                   counter    name, alias (promoted)
qcloop_pdc_error                          histogram  view, structure: realised Dice minus pDC
                                                     of a corrected case (feedback)
qcloop_est_dice_error                     histogram  view, structure: realised Dice minus
                                                     est_dice of a corrected case (feedback)
qcloop_feedback_total                     counter    view, flagged, failed: the flag confusion
                                                     counts of corrected cases (feedback)
========================================  =========  ==========================================

Per structure, a case's pDC is its best value over candidates and its pHD its best (smallest)
value: the same quantities its fences judged. The window gauges mirror the service's own
rolling window (the core's, received through ``WindowChanged``): this module keeps none.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from qcloop.monitor import (
    CaseFailed,
    CaseScored,
    DriftAlert,
    FeedbackReceived,
    ModelRefined,
    ModelsLoaded,
    ModelVersionPromoted,
    ModelVersionRegistered,
    WindowChanged,
)

log = logging.getLogger(__name__)

__all__ = ["QcMetrics"]

PDC_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
#: realised Dice minus pDC: negative where QC was optimistic.
ERROR_BUCKETS = (-0.5, -0.3, -0.2, -0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
PHD_BUCKETS_MM = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0)
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


#: Values the ``phase`` label of the fence gauges takes (anything else counts as ``all``).
_FENCE_PHASES = frozenset({"ED", "ES", "all"})


class QcMetrics:
    """The QC-drift metrics of one service, in their own registry.

    Args:
        registry: a ``prometheus_client.CollectorRegistry``; a new one when ``None``.
    """

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = registry if registry is not None else CollectorRegistry()
        self._case_metrics()
        self._window_metrics()
        self._lifecycle_metrics()

    def _case_metrics(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        r = self.registry
        self.pdc = Histogram(
            "qcloop_pdc",
            "Pseudo-Dice of scored cases (best over candidates).",
            ["view", "structure"],
            buckets=PDC_BUCKETS,
            registry=r,
        )
        self.phd = Histogram(
            "qcloop_phd_mm",
            "Pseudo-Hausdorff distance of scored cases in mm (best over candidates).",
            ["view", "structure"],
            buckets=PHD_BUCKETS_MM,
            registry=r,
        )
        self.est_dice = Histogram(
            "qcloop_est_dice",
            "Calibrated Dice estimate of the QC-selected output (qcloop fit-estimator).",
            ["view", "structure"],
            buckets=PDC_BUCKETS,
            registry=r,
        )
        self.scored = Counter("qcloop_cases_scored", "Cases scored.", ["view"], registry=r)
        self.flagged = Counter(
            "qcloop_cases_flagged", "Cases flagged out of distribution.", ["view"], registry=r
        )
        self.model_info = Gauge(
            "qcloop_model_info",
            "The model version in use per view (value 1).",
            ["view", "version", "runtime"],
            registry=r,
        )
        self.reloads = Counter(
            "qcloop_model_reloads", "Model reloads, by outcome.", ["outcome"], registry=r
        )
        self.errors = Counter(
            "qcloop_case_errors",
            "Cases that could not be scored (unreadable or invalid input).",
            ["stage"],
            registry=r,
        )
        self.fence_pdc = Gauge(
            "qcloop_fence_pdc_low", "Lower pDC fence in use.", ["view", "phase"], registry=r
        )
        self.fence_phd = Gauge(
            "qcloop_fence_phd_high_mm",
            "Upper pHD fence in use (mm).",
            ["view", "phase"],
            registry=r,
        )
        self.latency = Histogram(
            "qcloop_case_latency_seconds",
            "Time to score one case (preprocess, segment, QC, select, restore).",
            ["view", "runtime"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )

    def _window_metrics(self) -> None:
        from prometheus_client import Gauge

        r = self.registry
        self.ood_fraction = Gauge(
            "qcloop_ood_fraction",
            "Fraction of OoD cases in the rolling window.",
            ["view"],
            registry=r,
        )
        self.window_cases = Gauge(
            "qcloop_window_cases", "Cases in the rolling window.", ["view"], registry=r
        )
        self.pdc_median = Gauge(
            "qcloop_pdc_window_median",
            "Median decision-structure pDC in the rolling window.",
            ["view"],
            registry=r,
        )
        self.est_median = Gauge(
            "qcloop_est_dice_window_median",
            "Median decision-structure est_dice (calibrated estimate) in the rolling window.",
            ["view"],
            registry=r,
        )
        self.pdc_reference = Gauge(
            "qcloop_pdc_reference_median",
            "Median decision-structure pDC of the reference (validation) cases.",
            ["view"],
            registry=r,
        )

    def _lifecycle_metrics(self) -> None:
        from prometheus_client import Counter, Histogram

        r = self.registry
        self.alerts = Counter(
            "qcloop_drift_alerts",
            "Drift alerts raised or received.",
            ["view", "source"],
            registry=r,
        )
        self.refinements = Counter(
            "qcloop_refinements", "Refinements that produced a new model set.", ["view"], registry=r
        )
        self.registered = Counter(
            "qcloop_model_versions_registered",
            "Model versions registered.",
            ["name"],
            registry=r,
        )
        self.promotions = Counter(
            "qcloop_promotions", "Aliases moved to a model version.", ["name", "alias"], registry=r
        )
        self.pdc_error = Histogram(
            "qcloop_pdc_error",
            "Realised Dice of a served mask (from its late correction) minus its pDC.",
            ["view", "structure"],
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.est_error = Histogram(
            "qcloop_est_dice_error",
            "Realised Dice of a served mask (from its late correction) minus its est_dice.",
            ["view", "structure"],
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.feedback = Counter(
            "qcloop_feedback",
            "Corrected cases by view, whether QC flagged them and whether they failed.",
            ["view", "flagged", "failed"],
            registry=r,
        )

    # ------------------------------------------------------------------ events

    def case_scored(self, event: CaseScored) -> None:
        """Account one scored case from its record: histograms, counters, fences, latency."""
        record = event.record
        view = event.view
        for s in record["candidates"][0]:
            best_pdc = max(c[s]["pdc"] for c in record["candidates"])
            best_phd = min(c[s]["phd_mm"] for c in record["candidates"])
            self.pdc.labels(view, s).observe(best_pdc)
            self.phd.labels(view, s).observe(best_phd)
        for s, e in ((record.get("estimate") or {}).get("structures") or {}).items():
            self.est_dice.labels(view, s).observe(e["dice"])
        self.scored.labels(view).inc()
        if record.get("ood"):
            self.flagged.labels(view).inc()
        fences = record.get("fences")
        if fences:
            # the phase comes from a client (serve's form field, a sidecar): as a label it
            # takes known values only; any other phase was judged by the pooled fences
            phase = str(record.get("phase", "all"))
            phase = phase if phase in _FENCE_PHASES else "all"
            self.fence_pdc.labels(view, phase).set(fences["pdc_low"])
            self.fence_phd.labels(view, phase).set(fences["phd_high"])
        if "latency_s" in record:
            runtime = str((record.get("runtime") or {}).get("name", "unknown"))
            self.latency.labels(view, runtime).observe(float(record["latency_s"]))

    def models_loaded(self, event: ModelsLoaded) -> None:
        """The models in use: one ``model_info`` series per view; a swap or a failed load
        counted in ``model_reloads_total``."""
        if event.outcome != "ok":
            self.reloads.labels("failed").inc()
            return
        self.model_info.clear()
        for view, info in event.views.items():
            version = str(info.get("version", "unregistered"))
            self.model_info.labels(view, version, str(info.get("runtime", "unknown"))).set(1)
        if event.reload:
            self.reloads.labels("ok").inc()

    def case_failed(self, event: CaseFailed) -> None:
        """Count a case that could not be scored, by stage."""
        self.errors.labels(event.stage).inc()

    def window_changed(self, event: WindowChanged) -> None:
        """Mirror a view's rolling window: size, OoD fraction, median and reference pDC."""
        view, stats = event.view, event.stats
        self.ood_fraction.labels(view).set(stats.ood_fraction)
        self.window_cases.labels(view).set(stats.n)
        # a value that is not known drops its series rather than keep a stale one
        if stats.median_pdc is not None:
            self.pdc_median.labels(view).set(stats.median_pdc)
        else:
            with contextlib.suppress(KeyError):
                self.pdc_median.remove(view)
        if stats.median_est is not None:
            self.est_median.labels(view).set(stats.median_est)
        else:
            with contextlib.suppress(KeyError):
                self.est_median.remove(view)
        if event.reference_median is not None:
            self.pdc_reference.labels(view).set(event.reference_median)
        else:
            with contextlib.suppress(KeyError):
                self.pdc_reference.remove(view)

    def drift_alert(self, event: DriftAlert) -> None:
        """Count a drift alert by view and source."""
        self.alerts.labels(event.view, event.source).inc()

    def feedback_received(self, event: FeedbackReceived) -> None:
        """A corrected case: its estimation error per structure and its flag confusion cell."""
        for structure, v in event.scores.items():
            if "pdc" in v and "dice" in v:
                self.pdc_error.labels(event.view, structure).observe(v["dice"] - v["pdc"])
            if "est_dice" in v and "dice" in v:
                self.est_error.labels(event.view, structure).observe(v["dice"] - v["est_dice"])
        flagged, failed = str(event.flagged).lower(), str(event.failed).lower()
        self.feedback.labels(event.view, flagged, failed).inc()

    def model_refined(self, event: ModelRefined) -> None:
        """Count a refinement of a view."""
        self.refinements.labels(event.view).inc()

    def model_version_registered(self, event: ModelVersionRegistered) -> None:
        """Count a registered model version."""
        self.registered.labels(event.name).inc()

    def model_version_promoted(self, event: ModelVersionPromoted) -> None:
        """Count an alias moved."""
        self.promotions.labels(event.name, event.alias).inc()

    # ------------------------------------------------------------------ exposition

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
