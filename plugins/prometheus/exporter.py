"""The Prometheus exporter plugin: metrics of every running qcloop service, fed only by the
event hooks.

* ``on_service_started``: a :class:`~qcloop.plugins.prometheus.metrics.QcMetrics` with its own
  registry is made for the service. For ``qcloop monitor`` it serves ``/metrics`` from its own
  HTTP server on ``monitoring.metrics_host:metrics_port`` (port 0: no endpoint) and records the
  URL in ``service.endpoints["metrics"]``; for ``qcloop serve`` it mounts ``GET /metrics`` and
  the HTTP metrics' middleware on the service's FastAPI app
  (:mod:`~qcloop.plugins.prometheus.http`).
* Every event is routed by its ``service`` id to that service's metrics: scored and failed
  cases, window changes (the window gauges mirror the core's window), drift alerts,
  refinements, registered and promoted versions, and for serve the models loaded and the work
  queue. An event with an id this exporter did not start is ignored. An event without one was
  emitted outside any service's own code (the model registry's lifecycle, a batch command):
  every service running in this process counts it, and with none running it is ignored.
* ``on_service_stopped`` closes the service's server and forgets its metrics.

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
    ModelRefined,
    ModelsLoaded,
    ModelVersionPromoted,
    ModelVersionRegistered,
    ServiceInfo,
    WindowChanged,
    hookimpl,
)
from qcloop.monitor.core.background_server import BackgroundServer
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
    server: BackgroundServer | None = None


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


def _serve_monitor_metrics(exported: _Exported) -> None:
    """Start the monitor's own ``/metrics`` server where its configuration asks for one."""
    service = exported.service
    monitoring = getattr(service.config, "monitoring", None)
    port = int(getattr(monitoring, "metrics_port", 0) or 0)
    if not port:
        return
    host = str(getattr(monitoring, "metrics_host", "127.0.0.1"))
    try:
        exported.server = exported.qc.serve(host, port)
    except OSError as exc:
        log.error(
            "cannot serve /metrics on %s:%d (monitoring.metrics_host/metrics_port): %s",
            host,
            port,
            exc,
        )
        return
    service.endpoints["metrics"] = exported.server.url


# --------------------------------------------------------------------------- hooks


@hookimpl
def on_service_started(service: ServiceInfo) -> None:
    """Make the service's metrics and open its ``/metrics``."""
    exported = _Exported(service, QcMetrics())
    if service.kind == "serve" and service.app is not None:
        exported.http = HttpMetrics(exported.qc.registry)
        mount_metrics(service.app, exported.qc.exposition, exported.http)
    elif service.kind == "monitor":
        _serve_monitor_metrics(exported)
    with _lock:
        _services[service.id] = exported


@hookimpl
def on_service_stopped(service: ServiceInfo) -> None:
    """Close the service's ``/metrics`` server and forget its metrics."""
    with _lock:
        exported = _services.pop(service.id, None)
    if exported is not None and exported.server is not None:
        exported.server.close()
        service.endpoints.pop("metrics", None)


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
