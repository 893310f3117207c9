"""The HTTP app of ``qcloop monitor``: one small ASGI app on one port (``monitoring.http_host``,
``monitoring.http_port``), served by :class:`~qcloop.monitor.core.http_endpoint.HttpEndpoint`.

* ``GET /healthz``: 200 and the monitor's state (``intake`` running or paused by a full disk,
  the views served, the files skipped); no secret. A liveness probe.
* ``POST /alertmanager``: the Alertmanager webhook, when the monitor was started with one
  (``qcloop monitor --webhook``; 404 naming the option otherwise). It answers 401 without the
  shared bearer secret, 411 without ``Content-Length``, 413 for a body over 1 MiB, 408 for a
  body that does not arrive within :data:`~qcloop.monitor.ops.webhook.BODY_TIMEOUT_S`, 400 for
  a body that is not Alertmanager's JSON, else 202 with one result per alert.
* ``GET /metrics``: added by a metrics exporter plugin when the service starts (the app is
  :attr:`ServiceInfo.app <qcloop.monitor.core.events.ServiceInfo>`), as for ``qcloop serve``.

Other methods get 405, other paths 404.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from qcloop.monitor.core.http_endpoint import HttpEndpoint
from qcloop.monitor.ops import webhook
from qcloop.monitor.ops.webhook import WEBHOOK_PATH, AlertDispatcher, parse_payload

__all__ = ["HEALTH_PATH", "monitor_app", "open_endpoint", "paths_served"]

HEALTH_PATH = "/healthz"


class _BodyTooLarge(Exception):
    pass


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, refused past ``limit`` bytes whatever ``Content-Length`` claimed."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _webhook_route(dispatcher: AlertDispatcher | None) -> Callable[[Any], Any]:
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    def error(code: int, message: str) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Bearer realm="qcloop"'} if code == 401 else None
        return JSONResponse({"error": message}, status_code=code, headers=headers)

    async def alertmanager(request: Any) -> JSONResponse:
        if dispatcher is None:
            return error(404, "the Alertmanager webhook is off: start qcloop monitor --webhook")
        if not dispatcher.authorised(request.headers.get("authorization")):
            return error(401, "missing or wrong bearer secret")
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return error(411, "Content-Length required")
        limit = webhook.MAX_BODY_BYTES
        if int(length) > limit:
            return error(413, f"body over {limit} bytes")
        timeout = webhook.BODY_TIMEOUT_S
        try:
            body = await asyncio.wait_for(_read_body(request, limit), timeout)
        except asyncio.TimeoutError:
            return error(408, f"the body did not arrive within {timeout:g} s")
        except _BodyTooLarge:
            return error(413, f"body over {limit} bytes")
        try:
            alerts = parse_payload(body)
        except ValueError as exc:
            return error(400, str(exc))
        # the monitor's handler takes its lock: off the event loop
        results = await run_in_threadpool(dispatcher.handle, alerts)
        return JSONResponse({"results": results}, status_code=202)

    return alertmanager


def monitor_app(health: Callable[[], dict[str, Any]], dispatcher: AlertDispatcher | None) -> Any:
    """The monitor's Starlette app: ``/healthz`` answering ``health()``, and the webhook
    (``dispatcher``; ``None``: the route answers 404 naming ``--webhook``)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def healthz(request: Any) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(health))

    async def http_error(request: Any, exc: Any) -> JSONResponse:  # 404, 405 as JSON
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    return Starlette(
        routes=[
            Route(HEALTH_PATH, healthz, methods=["GET"]),
            Route(WEBHOOK_PATH, _webhook_route(dispatcher), methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error},
    )


def open_endpoint(app: Any, monitoring: Any, name: str = "qcloop-http") -> HttpEndpoint | None:
    """Serve ``app`` where ``monitoring.http_host``/``http_port`` say (port 0: ``None``);
    ``OSError`` naming the address and the settings when it cannot listen there."""
    port = int(monitoring.http_port)
    if not port:
        return None
    host = str(monitoring.http_host)
    try:
        endpoint = HttpEndpoint(app, host, port, name=name)
    except OSError as exc:
        raise OSError(
            f"cannot listen on {host}:{port} (monitoring.http_host/http_port): {exc}"
        ) from exc
    return endpoint.start()


def paths_served(app: Any, *, webhook: bool) -> list[str]:
    """The paths ``app`` answers: its routes (``/metrics`` where an exporter added it), the
    webhook's only when it is on."""
    paths = [str(getattr(route, "path", "")) for route in app.routes]
    return [p for p in paths if p and (webhook or p != WEBHOOK_PATH)]
