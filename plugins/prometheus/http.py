"""The HTTP metrics of a service's app (``qcloop serve``'s, the monitor's), and ``GET /metrics``
mounted on it.

When a service's app starts, the exporter adds these metrics to the app's QC-metrics registry (one
``/metrics`` serves both), installs a pure ASGI middleware that counts requests by route
template (never by raw path), and adds the ``/metrics`` route. The work queue arrives as
``AdmissionChanged`` events:

========================================  =========  ==========================================
name                                      type       labels (from what)
========================================  =========  ==========================================
qcloop_http_requests_total                counter    endpoint, method, status (middleware)
qcloop_http_request_duration_seconds      histogram  endpoint (middleware)
qcloop_http_rejected_total                counter    (admission: a request refused, queue full)
qcloop_http_queue_depth                   gauge      (admission: requests waiting)
qcloop_http_in_flight                     gauge      (admission: requests being scored)
========================================  =========  ==========================================

The models in use (``qcloop_model_info``, ``qcloop_model_reloads_total``) are QC metrics, the
monitor's and serve's alike (``metrics.py``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from qcloop.monitor import AdmissionChanged

__all__ = ["HttpMetrics", "mount_metrics"]

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: methods counted by name; any other is counted as ``other`` (bounded label values).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class HttpMetrics:
    """A serve app's HTTP metrics, registered in its QC metrics' registry."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter(
            "qcloop_http_requests",
            "HTTP requests answered, by route, method and status.",
            ["endpoint", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "qcloop_http_request_duration_seconds",
            "Time to answer an HTTP request, by route.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.rejected = Counter(
            "qcloop_http_rejected",
            "Requests refused with 429 because the queue was full.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "qcloop_http_queue_depth",
            "Admitted segmentation requests waiting (receiving the upload or for a worker).",
            registry=registry,
        )
        self.in_flight = Gauge(
            "qcloop_http_in_flight", "Segmentation requests being scored now.", registry=registry
        )

    # ------------------------------------------------------------------ events

    def admission_changed(self, event: AdmissionChanged) -> None:
        """The work queue: requests running and waiting; a refused one counted."""
        if event.rejected:
            self.rejected.inc()
        self.in_flight.set(event.running)
        self.queue_depth.set(event.waiting)

    # ------------------------------------------------------------------ middleware

    def middleware(self, app: Asgi) -> Asgi:
        """``app`` wrapped to count every HTTP request by route template, method and status,
        and time it."""
        metrics = self

        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            status = {"code": 500}

            async def send_status(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = int(message["status"])
                await send(message)

            start = time.perf_counter()
            try:
                await app(scope, receive, send_status)
            finally:
                route = scope.get("route")
                endpoint = getattr(route, "path", None) or "unmatched"
                method = scope.get("method", "")
                method = method if method in METHODS else "other"
                metrics.requests.labels(endpoint, method, str(status["code"])).inc()
                metrics.duration.labels(endpoint).observe(time.perf_counter() - start)

        return wrapped


def _middleware_class(http: HttpMetrics) -> type:
    """A middleware class for ``app.add_middleware`` wrapping :meth:`HttpMetrics.middleware`."""

    class PrometheusHttpMetrics:
        def __init__(self, app: Asgi) -> None:
            self._app = http.middleware(app)

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            await self._app(scope, receive, send)

    return PrometheusHttpMetrics


def mount_metrics(app: Any, exposition: Callable[[], bytes], http: HttpMetrics) -> None:
    """Add ``GET /metrics`` (the text of ``exposition()``) and the request-counting middleware
    to an app that has not started yet: a FastAPI app (serve; the route appears in its OpenAPI
    schema) or a Starlette app (the monitor's)."""
    from prometheus_client import CONTENT_TYPE_LATEST
    from starlette.responses import Response

    async def metrics_endpoint() -> Response:
        """Prometheus metrics: QC drift (``qcloop_*``) and HTTP (``qcloop_http_*``)."""
        return Response(exposition(), media_type=CONTENT_TYPE_LATEST)

    if hasattr(app, "add_api_route"):  # FastAPI
        app.add_api_route(
            "/metrics",
            metrics_endpoint,
            methods=["GET"],
            response_model=None,  # a plain Response (its annotation names a local import)
            response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
            tags=["service"],
        )
    else:  # Starlette: endpoints take the request

        async def starlette_endpoint(request: Any) -> Response:
            return await metrics_endpoint()

        app.add_route("/metrics", starlette_endpoint, methods=["GET"])
    app.add_middleware(_middleware_class(http))
