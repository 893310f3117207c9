"""The ``qcloop serve`` app factory.

Every upload is checked from its header before any voxel is decompressed
(:mod:`qcloop.deploy.serve.upload`), stored under a server-chosen name in a private temporary
folder and deleted after the request. Scoring runs in a bounded pool
(:mod:`qcloop.deploy.serve.admission`). Models come from a
:class:`~qcloop.deploy.serve.model_source.ModelSource` and are swapped by a
:class:`~qcloop.deploy.serve.model_manager.ModelManager` without dropping a request.

Plugins see the app once, before it starts, through ``on_service_started`` (a metrics exporter
adds ``GET /metrics`` and its HTTP middleware there), and every event it emits carries the
service's id; ``on_service_stopped`` follows at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from qcloop.deploy.serve.model_manager import ModelManager
from qcloop.deploy.serve.model_source import ModelBundle, ModelSource
from qcloop.deploy.serve.routes import add_routes
from qcloop.deploy.serve.service import EventSink, ServeService
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.events import ServiceInfo

__all__ = ["create_app"]


async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """A request that fails validation: 422 with one ``detail`` line listing the problems."""
    problems = [
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
        for err in exc.errors()
    ]
    return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, 422)


def _lifespan(service: ServeService, info: ServiceInfo, pm: Any) -> Any:
    """Start polling the model source while the app runs; at shutdown stop it, tell the
    plugins, finish running jobs and remove the temporary folder."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.manager.start()
        try:
            yield
        finally:
            await service.manager.stop()
            pm.service_stopped(info)
            await asyncio.to_thread(service.close)

    return lifespan


def _version() -> str:
    from qcloop.monitor import __version__

    return str(__version__)


def create_app(
    source: ModelSource,
    cfg: QcloopConfig,
    *,
    api_key: str | None,
    initial: ModelBundle | None = None,
    allow_no_auth: bool = False,
    plugin_manager: Any = None,
) -> FastAPI:
    """The ``qcloop serve`` ASGI app.

    Args:
        source: where the models come from (``RunSource``, ``RegistrySource``).
        cfg: configuration; its ``serving`` section sets runtime, limits and the poll period,
            ``monitoring.window`` the size of the views' rolling windows.
        api_key: the key every protected route requires as ``Authorization: Bearer KEY``.
        initial: models already loaded (else they load in the background; ``/readyz`` says 503
            until then).
        allow_no_auth: serve without a key (``api_key=None``); only for an explicit opt-in.
        plugin_manager: where events go and which plugins see the app (default: the
            process-wide plugin manager).

    Raises:
        ValueError: no ``api_key`` and ``allow_no_auth`` not set.
        SourceError: ``serving.runtime`` is not a registered runtime.
    """
    if api_key is None and not allow_no_auth:
        raise ValueError("an API key is required (or allow_no_auth=True, explicitly)")
    if plugin_manager is None:
        from qcloop.monitor.core.plugin_manager import get_plugin_manager

        plugin_manager = get_plugin_manager()
    info = ServiceInfo(kind="serve", config=cfg)
    events = EventSink(plugin_manager, info.id)
    manager = ModelManager(source, cfg.serving.runtime, cfg.serving.reload_poll_s)
    service = ServeService(manager, cfg, events)
    manager.on_swap, manager.on_failure = service.models_swapped, service.models_failed
    app = FastAPI(
        title="qcloop",
        version=_version(),
        summary="Cardiac MRI segmentation with quality control on every request.",
        docs_url=None,
        redoc_url=None,
        lifespan=_lifespan(service, info, plugin_manager),
    )
    app.state.service = service
    app.state.manager = manager
    app.state.api_key = api_key
    app.state.service_info = info
    app.add_exception_handler(RequestValidationError, _invalid)
    add_routes(app)
    info.app = app
    plugin_manager.service_started(info)
    if initial is not None:
        manager.install(initial)
    return app
