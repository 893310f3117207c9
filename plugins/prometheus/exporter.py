"""The Prometheus exporter plugin: metrics of every running qcloop service, fed only by the
event hooks.

* ``on_service_started``: a :class:`~qcloop.plugins.prometheus.metrics.QcMetrics` with its own
  registry is made for the service, and ``GET /metrics`` with the HTTP metrics' middleware is
  mounted on the service's ASGI app (:mod:`~qcloop.plugins.prometheus.http`): ``qcloop
  serve``'s FastAPI app, or the monitor's HTTP app (served on ``monitoring.http_host:http_port``
  by the monitor itself; port 0: nowhere). A service without an app gets metrics but no
  endpoint.
* Every event is routed by its ``service`` id to that service's metrics: scored and failed
  cases, window changes (the window gauges mirror the core's window), drift alerts,
  refinements, registered and promoted versions, and for serve the models loaded and the work
  queue. An event with an id this exporter did not start is ignored. An event without one was
  emitted outside any service's own code (the model registry's lifecycle, a batch command):
  every service running in this process counts it, and with none running it is ignored.
* ``on_service_stopped`` forgets the service's metrics.

Block this plugin (``QCLOOP_BLOCK_PLUGINS=qcloop.plugins.prometheus.exporter`` or
``plugins.block`` in a configuration) and services run without ``/metrics``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from qcloop.monitor import (
    AdmissionChanged,
    CaseFailed,
    CaseScored,
    DriftAlert,
    FeedbackReceived,
    ModelRefined,
    ModelsLoaded,
    ModelVersionPromoted,
    ModelVersionRegistered,
    ServiceInfo,
    WindowChanged,
    hookimpl,
)
from qcloop.plugins.prometheus.http import HttpMetrics, mount_metrics
from qcloop.plugins.prometheus.metrics import QcMetrics

log = logging.getLogger(__name__)

__all__ = ["QcMetrics", "service_metrics"]


@dataclass
class _Exported:
    """What the exporter keeps for one running service."""

    service: ServiceInfo
    qc: QcMetrics
    http: HttpMetrics | None = None


_services: dict[str, _Exported] = {}
_lock = threading.Lock()


def service_metrics(service_id: str) -> QcMetrics | None:
    """The metrics of a running service (``ServiceInfo.id``), ``None`` when unknown."""
    with _lock:
        exported = _services.get(service_id)
    return exported.qc if exported is not None else None


def _targets(service_id: str | None) -> list[_Exported]:
    with _lock:
        if service_id is None:
            return list(_services.values())
        exported = _services.get(service_id)
    return [exported] if exported is not None else []


def _dispatch(event: Any, method: str, *, http: bool = False) -> None:
    """Hand ``event`` to ``method`` of the metrics of the services it concerns."""
    for exported in _targets(event.service):
        target = exported.http if http else exported.qc
        if target is None:
            continue
        try:
            getattr(target, method)(event)
        except Exception:  # one service's metrics never keep the others from theirs
            log.exception(
                "prometheus exporter: %s of service %s failed", method, exported.service.id
            )


# --------------------------------------------------------------------------- hooks


@hookimpl
def on_service_started(service: ServiceInfo) -> None:
    """Make the service's metrics and open its ``/metrics``."""
    exported = _Exported(service, QcMetrics())
    if service.app is not None:
        exported.http = HttpMetrics(exported.qc.registry)
        mount_metrics(service.app, exported.qc.exposition, exported.http)
    with _lock:
        _services[service.id] = exported


@hookimpl
def on_service_stopped(service: ServiceInfo) -> None:
    """Forget the service's metrics (its app, and ``/metrics`` with it, stop with it)."""
    with _lock:
        _services.pop(service.id, None)


@hookimpl
def on_case_scored(event: CaseScored) -> None:
    """Histograms, counters, fences and latency of a scored case."""
    _dispatch(event, "case_scored")


@hookimpl
def on_case_failed(event: CaseFailed) -> None:
    """Count a case that could not be scored."""
    _dispatch(event, "case_failed")


@hookimpl
def on_window_changed(event: WindowChanged) -> None:
    """Mirror a view's rolling window in the window gauges."""
    _dispatch(event, "window_changed")


@hookimpl
def on_drift_alert(event: DriftAlert) -> None:
    """Count a drift alert."""
    _dispatch(event, "drift_alert")


@hookimpl
def on_feedback_received(event: FeedbackReceived) -> None:
    """Observe the estimation error and count the flag confusion of a corrected case."""
    _dispatch(event, "feedback_received")


@hookimpl
def on_model_refined(event: ModelRefined) -> None:
    """Count a refinement."""
    _dispatch(event, "model_refined")


@hookimpl
def on_model_version_registered(event: ModelVersionRegistered) -> None:
    """Count a registered model version."""
    _dispatch(event, "model_version_registered")


@hookimpl
def on_model_version_promoted(event: ModelVersionPromoted) -> None:
    """Count a promotion."""
    _dispatch(event, "model_version_promoted")


@hookimpl
def on_models_loaded(event: ModelsLoaded) -> None:
    """The models a service (the monitor or a serve app) uses, and its reloads."""
    _dispatch(event, "models_loaded")


@hookimpl
def on_admission_changed(event: AdmissionChanged) -> None:
    """A serve app's work queue."""
    _dispatch(event, "admission_changed", http=True)
