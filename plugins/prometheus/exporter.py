"""Prometheus metrics of QC drift, fed by qcloop's event hooks.

A :class:`QcMetrics` owns its own ``CollectorRegistry`` (never the global one, so several can
live in one process, e.g. in tests) and, once :meth:`QcMetrics.activate`-d, receives the
``on_case_scored``, ``on_drift_alert``, ``on_model_refined``, ``on_model_version_registered``
and ``on_model_version_promoted`` events through this module's hook implementations. Labels are
view, structure, phase, model version, runtime and outcome: never a case id.

Exported metrics (all prefixed ``qcloop_``):

========================================  =========  ==========================================
name                                      type       labels
========================================  =========  ==========================================
qcloop_pdc                                histogram  view, structure, model_version
qcloop_phd_mm                             histogram  view, structure, model_version
qcloop_cases_scored_total                 counter    view, model_version
qcloop_cases_flagged_total                counter    view, model_version
qcloop_case_errors_total                  counter    stage
qcloop_ood_fraction                       gauge      view (over the rolling window)
qcloop_window_cases                       gauge      view
qcloop_pdc_window_median                  gauge      view (decision structure)
qcloop_pdc_reference_median               gauge      view (set by the monitor)
qcloop_fence_pdc_low                      gauge      view, phase
qcloop_fence_phd_high_mm                  gauge      view, phase
qcloop_case_latency_seconds               histogram  view, runtime
qcloop_drift_alerts_total                 counter    view, source
qcloop_refinements_total                  counter    view
qcloop_model_versions_registered_total    counter    name
qcloop_promotions_total                   counter    name, alias
========================================  =========  ==========================================

Per structure, a case's pDC is its best value over candidates and its pHD its best (smallest)
value: the same quantities its fences judged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from qcloop.monitor import hookimpl
from qcloop.monitor.ops.drift import RollingWindow, decision_pdc

log = logging.getLogger(__name__)

PDC_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
PHD_BUCKETS_MM = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0)
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_active: list[QcMetrics] = []
_active_lock = threading.Lock()


class QcMetrics:
    """The QC-drift metrics of one process, in their own registry.

    Args:
        window: rolling-window size (cases per view) of the OoD-fraction and median gauges.
        registry: a ``prometheus_client.CollectorRegistry``; a new one when ``None``.
    """

    def __init__(self, window: int = 50, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.window_size = int(window)
        self._windows: dict[str, RollingWindow] = {}
        self._lock = threading.Lock()
        self.pdc = Histogram(
            "qcloop_pdc",
            "Pseudo-Dice of scored cases (best over candidates).",
            ["view", "structure", "model_version"],
            buckets=PDC_BUCKETS,
            registry=r,
        )
        self.phd = Histogram(
            "qcloop_phd_mm",
            "Pseudo-Hausdorff distance of scored cases in mm (best over candidates).",
            ["view", "structure", "model_version"],
            buckets=PHD_BUCKETS_MM,
            registry=r,
        )
        self.scored = Counter(
            "qcloop_cases_scored", "Cases scored.", ["view", "model_version"], registry=r
        )
        self.flagged = Counter(
            "qcloop_cases_flagged",
            "Cases flagged out of distribution.",
            ["view", "model_version"],
            registry=r,
        )
        self.errors = Counter(
            "qcloop_case_errors",
            "Cases that could not be scored (unreadable or invalid input).",
            ["stage"],
            registry=r,
        )
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
        self.pdc_reference = Gauge(
            "qcloop_pdc_reference_median",
            "Median decision-structure pDC of the reference (validation) cases.",
            ["view"],
            registry=r,
        )
        self.fence_pdc = Gauge(
            "qcloop_fence_pdc_low",
            "Lower pDC fence in use.",
            ["view", "phase"],
            registry=r,
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

    # ------------------------------------------------------------------ events

    def observe_case(self, record: dict[str, Any]) -> None:
        """Account one scored case from its JSON record (as written to the JSONL stream)."""
        view = str(record.get("view", "unknown"))
        version = str((record.get("model") or {}).get("version", "unregistered"))
        structures = record["candidates"][0].keys()
        for s in structures:
            best_pdc = max(c[s]["pdc"] for c in record["candidates"])
            best_phd = min(c[s]["phd_mm"] for c in record["candidates"])
            self.pdc.labels(view, s, version).observe(best_pdc)
            self.phd.labels(view, s, version).observe(best_phd)
        self.scored.labels(view, version).inc()
        if record.get("ood"):
            self.flagged.labels(view, version).inc()
        fences = record.get("fences")
        if fences:
            phase = str(record.get("phase", "all"))
            self.fence_pdc.labels(view, phase).set(fences["pdc_low"])
            self.fence_phd.labels(view, phase).set(fences["phd_high"])
        if "latency_s" in record:
            runtime = str((record.get("runtime") or {}).get("name", "unknown"))
            self.latency.labels(view, runtime).observe(float(record["latency_s"]))
        with self._lock:
            window = self._windows.setdefault(view, RollingWindow(self.window_size))
            window.add(bool(record.get("ood")), decision_pdc(record))
            self._publish(view, window)

    def case_error(self, stage: str) -> None:
        """Count a case that could not be scored (``stage``: read, validate, score)."""
        self.errors.labels(stage).inc()

    def reset_window(self, view: str) -> None:
        """Start the view's rolling window again (after a new model version takes over)."""
        with self._lock:
            window = self._windows.setdefault(view, RollingWindow(self.window_size))
            window.clear()
            self._publish(view, window)

    def restore_window(self, view: str, cases: list[tuple[bool, float]]) -> None:
        """Refill the view's rolling window with (OoD flag, decision pDC) pairs, oldest first,
        without counting them again (a restarted monitor restores its window from its ledger)."""
        with self._lock:
            window = self._windows.setdefault(view, RollingWindow(self.window_size))
            window.clear()
            for ood, pdc in cases:
                window.add(ood, pdc)
            self._publish(view, window)

    def set_reference_median(self, view: str, median_pdc: float) -> None:
        """The reference median decision pDC the window is compared with."""
        self.pdc_reference.labels(view).set(median_pdc)

    def drift_alert(self, alert: dict[str, Any]) -> None:
        """Count a drift alert (``alert["view"]``, ``alert["source"]``)."""
        self.alerts.labels(
            str(alert.get("view", "unknown")), str(alert.get("source", "qcloop"))
        ).inc()

    def model_refined(self, view: str) -> None:
        """Count a refinement of ``view``."""
        self.refinements.labels(view).inc()

    def version_registered(self, name: str) -> None:
        """Count a model version registered under ``name``."""
        self.registered.labels(name).inc()

    def promoted(self, name: str, alias: str) -> None:
        """Count an alias moved."""
        self.promotions.labels(name, alias).inc()

    def _publish(self, view: str, window: RollingWindow) -> None:
        stats = window.stats()
        self.ood_fraction.labels(view).set(stats.ood_fraction)
        self.window_cases.labels(view).set(stats.n)
        if stats.median_pdc is not None:
            self.pdc_median.labels(view).set(stats.median_pdc)
        else:  # an empty window has no median: drop the series rather than keep a stale one
            with contextlib.suppress(KeyError):
                self.pdc_median.remove(view)

    # ------------------------------------------------------------------ exposition

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
        """Serve ``/metrics`` over HTTP in a background thread (``port=0``: a free port)."""
        from prometheus_client import start_http_server

        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)

    def activate(self) -> QcMetrics:
        """Receive qcloop's events from now on; returns ``self``."""
        with _active_lock:
            if self not in _active:
                _active.append(self)
        return self

    def deactivate(self) -> None:
        """Stop receiving events."""
        with _active_lock:
            if self in _active:
                _active.remove(self)


class MetricsServer:
    """A running ``/metrics`` HTTP server."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def host(self) -> str:
        """Bound address."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """Bound port."""
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _each(method: str, *args: Any) -> None:
    with _active_lock:
        targets = list(_active)
    for metrics in targets:
        try:
            getattr(metrics, method)(*args)
        except Exception:  # a metric must never break the work it reports on
            log.exception("prometheus exporter: %s failed", method)


# --------------------------------------------------------------------------- hooks


@hookimpl
def on_case_scored(record: dict[str, Any]) -> None:
    """Update the active metrics from a scored case."""
    _each("observe_case", record)


@hookimpl
def on_drift_alert(alert: dict[str, Any]) -> None:
    """Count a drift alert."""
    _each("drift_alert", alert)


@hookimpl
def on_model_refined(view: str, run_dir: str, summary: dict[str, Any]) -> None:
    """Count a refinement."""
    _each("model_refined", view)


@hookimpl
def on_model_version_registered(name: str, version: str, tags: dict[str, str]) -> None:
    """Count a registered model version."""
    _each("version_registered", name)


@hookimpl
def on_model_version_promoted(
    name: str, version: str, alias: str, previous_version: str | None
) -> None:
    """Count a promotion."""
    _each("promoted", name, alias)
