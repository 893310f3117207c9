"""``qcloop serve``: an HTTP API that segments a NIfTI volume and runs QC on every request.

:func:`create_app` builds the ASGI app (FastAPI, with its OpenAPI schema at ``/openapi.json``):

=========================  ======  =====================================================
route                      auth    what
=========================  ======  =====================================================
POST /v1/segment           yes     multipart ``file`` (.nii/.nii.gz), ``view``, ``phase``
GET  /v1/masks/{token}     yes     a mask kept for one fetch (``?mask=link``)
GET  /v1/models            yes     versions in use, runtime, execution providers
GET  /healthz              no      liveness
GET  /readyz               no      readiness: models loaded (no detail beyond that)
GET  /metrics              no      Prometheus text format
=========================  ======  =====================================================

Every upload is checked from its header before any voxel is decompressed
(:mod:`qcloop.deploy.serve_upload`), stored under a server-chosen name in a private temporary
folder and deleted after the request. Scoring runs in a pool of ``serving.max_concurrency``
threads (PyTorch and ONNX Runtime release the GIL), never on the event loop; at most
``serving.queue_size`` more requests wait, and a request beyond those is answered 429 with
``Retry-After`` at once. Models come from a :class:`~qcloop.deploy.serve_models.ModelSource` and
are swapped by a :class:`~qcloop.deploy.serve_models.ModelManager` without dropping a request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import math
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from qcloop.deploy.serve_models import (
    ModelBundle,
    ModelManager,
    ModelSource,
    RegistrySource,
    RunSource,
    SourceError,
)
from qcloop.deploy.serve_upload import (
    UploadLimits,
    UploadProblem,
    inspect_upload,
    names_from_filename,
    store_upload,
)
from qcloop.monitor.core.config import QcloopConfig

log = logging.getLogger(__name__)

__all__ = [
    "API_KEY_ENV",
    "MIN_KEY_LENGTH",
    "MaskStore",
    "ModelBundle",
    "ModelSource",
    "RegistrySource",
    "RunSource",
    "SourceError",
    "WorkLimiter",
    "create_app",
    "read_api_key",
]

API_KEY_ENV = "QCLOOP_API_KEY"
#: shortest API key accepted (characters).
MIN_KEY_LENGTH = 16
#: masks kept for ``?mask=link``: at most this many, this many bytes, this many seconds.
MASK_STORE_ENTRIES = 64
MASK_STORE_BYTES = 256 * 1024 * 1024
MASK_TTL_S = 300.0
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_PHASE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_TOKEN_PATTERN = r"^[A-Za-z0-9_-]{16,128}$"
#: the ``Authorization: Bearer`` scheme (shown in the OpenAPI schema); checked by the app.
_BEARER = HTTPBearer(
    auto_error=False, description=f"The API key ({API_KEY_ENV} or serving.api_key_file)."
)
_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# --------------------------------------------------------------------------- API key


def read_api_key(cfg: QcloopConfig, environ: dict[str, str] | None = None) -> str | None:
    """The API key: ``QCLOOP_API_KEY`` when set, else the file ``serving.api_key_file``.

    Returns ``None`` when neither is set.

    Raises:
        ValueError: the key file cannot be read, or a key is shorter than ``MIN_KEY_LENGTH``.
    """
    import os

    env = os.environ if environ is None else environ
    key = env.get(API_KEY_ENV, "").strip()
    source = f"environment variable {API_KEY_ENV}"
    if not key and cfg.serving.api_key_file:
        path = Path(cfg.serving.api_key_file).expanduser()
        source = f"serving.api_key_file {path}"
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the API key file ({exc})") from exc
        if not key:
            raise ValueError(f"{path}: the API key file is empty")
    if not key:
        return None
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(
            f"{source}: the API key has {len(key)} characters; use at least {MIN_KEY_LENGTH} "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return key


# --------------------------------------------------------------------------- response models


class ErrorResponse(BaseModel):
    """An error and its reason."""

    detail: str


class InlineMask(BaseModel):
    """The mask as a base64-encoded gzipped NIfTI file (uint8 labels, the upload's affine)."""

    kind: Literal["inline"] = "inline"
    filename: str
    media_type: str
    base64: str


class LinkMask(BaseModel):
    """A one-time URL to fetch the mask (``GET``, with the API key), valid ``expires_in_s``."""

    kind: Literal["link"] = "link"
    url: str
    expires_in_s: float


class SegmentResponse(BaseModel):
    """The QC record of the case and its mask."""

    request_id: str
    record: dict[str, Any] = Field(
        description="pDC/pHD per structure and candidate, fences, OoD flag, selection, model "
        "versions, runtime and providers, latency."
    )
    mask: InlineMask | LinkMask = Field(discriminator="kind")


class HealthResponse(BaseModel):
    """Liveness."""

    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    """Readiness: whether models are loaded."""

    ready: bool
    reason: str | None = None


class ViewModels(BaseModel):
    """The models serving one view."""

    model: dict[str, Any]
    runtime: str
    providers: list[str]
    candidates: int
    input_size: int


class ModelsResponse(BaseModel):
    """The models in use."""

    ready: bool
    source: str
    runtime: str
    fingerprint: str | None = None
    loaded_at: str | None = None
    reloads: int
    reload_failures: int
    last_reload_error: str | None = None
    views: dict[str, ViewModels]


# --------------------------------------------------------------------------- machinery


class HttpMetrics:
    """The service's HTTP metrics, registered in the QC metrics' registry (one ``/metrics``)."""

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
            buckets=_LATENCY_BUCKETS_S,
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
        self.reloads = Counter(
            "qcloop_model_reloads",
            "Model reloads, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.model_info = Gauge(
            "qcloop_model_info",
            "The model version in use per view (value 1).",
            ["view", "version", "runtime"],
            registry=registry,
        )

    def middleware(self, app: Any) -> Callable[..., Any]:
        """A pure ASGI middleware counting requests by route template (never by raw path)."""
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
                method = method if method in _METHODS else "other"  # bounded label values
                metrics.requests.labels(endpoint, method, str(status["code"])).inc()
                metrics.duration.labels(endpoint).observe(time.perf_counter() - start)

        return wrapped


class WorkLimiter:
    """Bounded concurrency with a bounded queue, for work run in a thread pool.

    ``workers`` jobs run at once; up to ``queue_size`` more are admitted and wait; beyond that
    :meth:`try_admit` refuses at once. Counters are touched from the event loop only.
    """

    def __init__(self, workers: int, queue_size: int, metrics: HttpMetrics | None = None) -> None:
        self.workers = int(workers)
        self.capacity = int(workers) + int(queue_size)
        self.admitted = 0
        self.running = 0
        self._semaphore = asyncio.Semaphore(self.workers)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._metrics = metrics
        self._service_s = 1.0  # running mean of a job's duration, for Retry-After

    def try_admit(self) -> bool:
        """Admit one request if a worker or a queue place is free."""
        if self.admitted >= self.capacity:
            if self._metrics is not None:
                self._metrics.rejected.inc()
            return False
        self.admitted += 1
        self._publish()
        return True

    def release(self) -> None:
        """The admitted request is done."""
        self.admitted -= 1
        self._publish()

    def retry_after_s(self) -> int:
        """Seconds after which a refused client may expect a free place."""
        return int(min(60, max(1, math.ceil(self._service_s * self.capacity / self.workers))))

    async def run(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` in the pool once a worker is free (the caller was admitted)."""
        async with self._semaphore:
            self.running += 1
            self._publish()
            start = time.perf_counter()
            try:
                return await asyncio.get_running_loop().run_in_executor(self._pool(), job)
            finally:
                self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - start)
                self.running -= 1
                self._publish()

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="qcloop-score")
            return self._executor

    def shutdown(self) -> None:
        """Stop the pool once its jobs are done (a later job starts a new one)."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.in_flight.set(self.running)
            self._metrics.queue_depth.set(max(0, self.admitted - self.running))


class MaskStore:
    """Masks kept for one fetch each: random tokens, expiry, bounded count and bytes."""

    def __init__(
        self,
        max_entries: int = MASK_STORE_ENTRIES,
        max_bytes: int = MASK_STORE_BYTES,
        ttl_s: float = MASK_TTL_S,
    ) -> None:
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self.ttl_s = float(ttl_s)
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, payload: bytes) -> str:
        """Keep ``payload``; returns its token. The oldest masks go when the store is full."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._expire(time.monotonic())
            while self._items and (
                len(self._items) >= self.max_entries or self._bytes + len(payload) > self.max_bytes
            ):
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= len(old)
            self._items[token] = (time.monotonic() + self.ttl_s, payload)
            self._bytes += len(payload)
        return token

    def take(self, token: str) -> bytes | None:
        """The mask of ``token``, removed from the store; ``None`` if unknown or expired."""
        with self._lock:
            self._expire(time.monotonic())
            item = self._items.pop(token, None)
            if item is None:
                return None
            self._bytes -= len(item[1])
            return item[1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _expire(self, now: float) -> None:
        for token in [t for t, (expires, _) in self._items.items() if expires <= now]:
            self._bytes -= len(self._items.pop(token)[1])


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON has no NaN/inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _client_name(filename: str | None) -> str | None:
    if not filename:
        return None
    return re.split(r"[\\/]", filename)[-1][:200] or None


class _Service:
    """Per-app state: models, limiter, mask store, private temporary folder, metrics."""

    def __init__(
        self,
        manager: ModelManager,
        cfg: QcloopConfig,
        metrics: Any,
        http: HttpMetrics,
    ) -> None:
        self.manager = manager
        self.cfg = cfg
        self.metrics = metrics
        self.http = http
        self.limiter = WorkLimiter(cfg.serving.max_concurrency, cfg.serving.queue_size, http)
        self.masks = MaskStore()
        self._workdir: Path | None = None
        self._workdir_lock = threading.Lock()

    @property
    def workdir(self) -> Path:
        """This server's private temporary folder (mode 0700), made on first use."""
        with self._workdir_lock:
            if self._workdir is None or not self._workdir.is_dir():
                self._workdir = Path(tempfile.mkdtemp(prefix="qcloop-serve-"))
            return self._workdir

    def limits(self, scorer: Any) -> UploadLimits:
        preprocessor = getattr(scorer, "preprocessor", None)
        return UploadLimits(
            max_inplane=self.cfg.serving.max_inplane,
            max_slices=self.cfg.serving.max_slices,
            target_spacing_mm=getattr(preprocessor, "target_spacing", None),
        )

    def process(
        self,
        bundle: ModelBundle,
        upload: UploadFile,
        view: str,
        phase: str,
        request_id: str,
        client_name: str | None,
    ) -> tuple[dict[str, Any], bytes]:
        """Check, load, score and encode one upload (runs in a worker thread)."""
        from qcloop.monitor.core.plugin_manager import get_plugin_manager
        from qcloop.monitor.data import CaseError, CaseSource, load_case, save_label_map

        start = time.perf_counter()
        scorer = bundle.scorers[view]
        try:
            summary = inspect_upload(upload.file, self.limits(scorer))
        except UploadProblem:
            self.metrics.case_error("validate")
            raise
        folder = Path(tempfile.mkdtemp(prefix="req-", dir=self.workdir))
        try:
            path = store_upload(upload.file, folder, summary)
            upload.file.close()  # the spooled copy is no longer needed
            source = CaseSource(
                subject=request_id, view=view, phase=phase, image_path=path, gt_path=None
            )
            try:
                case = load_case(source)
            except CaseError as exc:
                self.metrics.case_error("read")
                raise UploadProblem(422, exc.reason) from exc
            except Exception as exc:  # nibabel/numpy on a hostile file: a bad upload, not a crash
                self.metrics.case_error("read")
                raise UploadProblem(
                    422, f"unreadable NIfTI file ({type(exc).__name__}: {exc})"
                ) from exc
            try:
                result = scorer.score(case)
            except CaseError as exc:
                self.metrics.case_error("score")
                raise UploadProblem(422, exc.reason) from exc
            mask_path = save_label_map(folder / "mask.nii.gz", result.labels, case)
            payload = mask_path.read_bytes()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        record = dict(result.record)
        record["image"] = client_name
        record["request"] = {
            "id": request_id,
            "upload": {"shape": list(summary.shape), "dtype": summary.dtype},
            "latency_s": time.perf_counter() - start,
            "timings_s": dict(result.timings_s),
        }
        record = _finite(record)
        try:
            get_plugin_manager().notify_case_scored(record)
        except Exception:  # an event listener must not fail the request it reports on
            log.exception("on_case_scored listeners failed")
        return record, payload

    def close(self) -> None:
        """Finish running jobs, then remove the temporary folder."""
        self.limiter.shutdown()
        with self._workdir_lock:
            workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


_SEGMENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The image: a single-file NIfTI (.nii or .nii.gz).",
                        },
                        "view": {
                            "type": "string",
                            "enum": ["SA", "LA"],
                            "description": "SA or LA; required when the file name does not tell "
                            "(tokens _SA_ / _LA_).",
                        },
                        "phase": {
                            "type": "string",
                            "pattern": _PHASE.pattern,
                            "description": "ED, ES or another frame name (the fences of that "
                            "phase, else the pooled ones); default from the file name.",
                        },
                    },
                }
            }
        },
    }
}


# --------------------------------------------------------------------------- the app


def create_app(
    source: ModelSource,
    cfg: QcloopConfig,
    *,
    api_key: str | None,
    metrics: Any = None,
    initial: ModelBundle | None = None,
    allow_no_auth: bool = False,
) -> FastAPI:
    """The ``qcloop serve`` ASGI app.

    Args:
        source: where the models come from (:class:`RunSource`, :class:`RegistrySource`).
        cfg: configuration; its ``serving`` section sets runtime, limits and the poll period.
        api_key: the key every protected route requires as ``Authorization: Bearer KEY``.
        metrics: a :class:`~qcloop.plugins.prometheus.exporter.QcMetrics` (a new one when
            ``None``); activated while the app runs, its registry served at ``/metrics`` with the
            HTTP metrics added to it.
        initial: models already loaded (else they load in the background; ``/readyz`` says 503
            until then).
        allow_no_auth: serve without a key (``api_key=None``); only for an explicit opt-in.

    Raises:
        ValueError: no ``api_key`` and ``allow_no_auth`` not set.
    """
    if api_key is None and not allow_no_auth:
        raise ValueError("an API key is required (or allow_no_auth=True, explicitly)")
    if metrics is None:
        from qcloop.plugins.prometheus.exporter import QcMetrics

        metrics = QcMetrics(window=cfg.monitoring.window)
    http = HttpMetrics(metrics.registry)

    def on_swap(old: ModelBundle | None, new: ModelBundle) -> None:
        http.model_info.clear()
        for view, info in new.describe()["views"].items():
            version = str(info["model"].get("version", "unregistered"))
            http.model_info.labels(view, version, info["runtime"]).set(1)
            if old is not None:
                metrics.reset_window(view)
        if old is not None:
            http.reloads.labels("ok").inc()

    manager = ModelManager(
        source,
        cfg.serving.runtime,
        cfg.serving.reload_poll_s,
        on_swap,
        on_failure=lambda _error: http.reloads.labels("failed").inc(),
    )
    if initial is not None:
        manager.install(initial)
    service = _Service(manager, cfg, metrics, http)
    max_body = int(cfg.serving.max_upload_mb * 1024 * 1024)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        metrics.activate()
        manager.start()
        try:
            yield
        finally:
            await manager.stop()
            metrics.deactivate()
            await asyncio.to_thread(service.close)

    app = FastAPI(
        title="qcloop",
        version=_version(),
        summary="Cardiac MRI segmentation with quality control on every request.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.manager = manager
    app.add_middleware(_asgi_middleware(http))

    async def require_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if api_key is None:
            return
        if credentials is None:
            raise HTTPException(
                401,
                "missing API key: send Authorization: Bearer KEY",
                headers={"WWW-Authenticate": "Bearer"},
            )
        given = credentials.credentials.encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, api_key.encode("utf-8")):
            raise HTTPException(403, "invalid API key")

    protected = [Depends(require_key)]

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        ]
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, 422)

    @app.get("/healthz", response_model=HealthResponse, tags=["service"])
    async def healthz() -> HealthResponse:
        """Liveness: the process answers."""
        return HealthResponse()

    @app.get(
        "/readyz",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse}},
        tags=["service"],
    )
    async def readyz() -> JSONResponse:
        """Readiness: 200 once models are loaded, else 503."""
        if manager.bundle is None:
            reason = "models are loading"
            if manager.last_error:
                reason = "models failed to load (see the server log)"
            return JSONResponse(ReadyResponse(ready=False, reason=reason).model_dump(), 503)
        return JSONResponse(ReadyResponse(ready=True).model_dump(), 200)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        tags=["service"],
    )
    async def metrics_endpoint() -> Response:
        """Prometheus metrics: QC drift (``qcloop_*``) and HTTP (``qcloop_http_*``)."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/v1/models",
        response_model=ModelsResponse,
        dependencies=protected,
        responses=_error_responses(401, 403),
        tags=["models"],
    )
    async def models() -> ModelsResponse:
        """The models in use: versions, runtime and execution providers read back per view."""
        bundle = manager.bundle
        described = bundle.describe() if bundle is not None else {}
        return ModelsResponse(
            ready=bundle is not None,
            source=source.describe(),
            runtime=manager.runtime,
            fingerprint=described.get("fingerprint"),
            loaded_at=described.get("loaded_at"),
            reloads=manager.reloads,
            reload_failures=manager.reload_failures,
            last_reload_error=manager.last_error,
            views={v: ViewModels(**d) for v, d in described.get("views", {}).items()},
        )

    @app.post(
        "/v1/segment",
        response_model=SegmentResponse,
        dependencies=protected,
        openapi_extra=_SEGMENT_BODY,
        responses={
            **_error_responses(400, 401, 403, 413, 415, 422, 429, 503),
            429: {
                "model": ErrorResponse,
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            },
        },
        tags=["segmentation"],
    )
    async def segment(
        request: Request,
        mask: Annotated[
            Literal["inline", "link"],
            Query(description="inline: the mask as base64 NIfTI; link: a one-time URL."),
        ] = "inline",
    ) -> SegmentResponse:
        """Segment one NIfTI volume, run QC and selection; the QC record and the mask."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "multipart/form-data":
            raise HTTPException(
                415,
                f"expected multipart/form-data with a 'file' part, got {content_type or 'none'}",
            )
        too_large = f"upload larger than {cfg.serving.max_upload_mb:g} MB (serving.max_upload_mb)"
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            raise HTTPException(413, too_large)
        bundle = manager.bundle
        if bundle is None:
            raise HTTPException(503, "models are loading", headers={"Retry-After": "5"})
        limiter = service.limiter
        if not limiter.try_admit():
            raise HTTPException(
                429,
                f"busy: {limiter.workers} request(s) running and the queue is full; retry later",
                headers={"Retry-After": str(limiter.retry_after_s())},
            )
        form = None
        try:
            try:
                form = await _limited(request, max_body).form(
                    max_files=1, max_fields=4, max_part_size=4096
                )
            except _BodyTooLarge as exc:
                raise HTTPException(413, too_large) from exc
            except ClientDisconnect as exc:
                raise HTTPException(400, "the client disconnected during the upload") from exc
            except StarletteHTTPException as exc:
                raise HTTPException(400, f"malformed multipart body: {exc.detail}") from exc
            upload = form.get("file")
            if upload is None:
                raise HTTPException(400, "missing form field 'file' (the NIfTI image)")
            if not isinstance(upload, UploadFile):
                raise HTTPException(400, "form field 'file' must be a file part (with a filename)")
            if len(form.getlist("file")) != 1:
                raise HTTPException(400, "send exactly one 'file' part")
            view, phase = _view_and_phase(form, upload.filename, bundle)
            request_id = uuid.uuid4().hex
            name = _client_name(upload.filename)
            record, payload = await limiter.run(
                lambda: service.process(bundle, upload, view, phase, request_id, name)
            )
        except UploadProblem as exc:
            raise HTTPException(exc.status, exc.reason) from exc
        finally:
            limiter.release()
            if form is not None:
                await form.close()
        if mask == "link":
            token = service.masks.put(payload)
            out_mask: InlineMask | LinkMask = LinkMask(
                url=str(request.url_for("fetch_mask", token=token)),
                expires_in_s=service.masks.ttl_s,
            )
        else:
            out_mask = InlineMask(
                filename="mask.nii.gz",
                media_type="application/gzip",
                base64=base64.b64encode(payload).decode("ascii"),
            )
        return SegmentResponse(request_id=request_id, record=record, mask=out_mask)

    @app.get(
        "/v1/masks/{token}",
        name="fetch_mask",
        dependencies=protected,
        response_class=Response,
        responses={
            200: {"content": {"application/gzip": {"schema": {"type": "string"}}}},
            **_error_responses(401, 403, 404, 422),
        },
        tags=["segmentation"],
    )
    async def fetch_mask(
        token: Annotated[str, PathParam(pattern=_TOKEN_PATTERN)],
    ) -> Response:
        """The mask of a ``?mask=link`` request (gzipped NIfTI); deleted once fetched."""
        payload = service.masks.take(token)
        if payload is None:
            raise HTTPException(404, "unknown or expired mask token (a mask is fetched once)")
        return Response(
            payload,
            media_type="application/gzip",
            headers={"Content-Disposition": 'attachment; filename="mask.nii.gz"'},
        )

    return app


class _BodyTooLarge(Exception):
    """The request body grew past the upload limit while it was being received."""


def _limited(request: Request, limit: int) -> Request:
    """``request`` whose body stream raises :class:`_BodyTooLarge` past ``limit`` bytes."""
    received = 0

    async def receive() -> Any:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge(received)
        return message

    return Request(request.scope, receive)


def _view_and_phase(form: Any, filename: str | None, bundle: ModelBundle) -> tuple[str, str]:
    """The case's view and phase from the form fields and the client's file name."""
    named_view, named_phase = names_from_filename(filename)
    view_field = form.get("view")
    phase_field = form.get("phase")
    for key, value in (("view", view_field), ("phase", phase_field)):
        if value is not None and not isinstance(value, str):
            raise HTTPException(400, f"form field {key!r} must be a text field")
    view = named_view
    if view_field:
        if view_field not in ("SA", "LA"):
            raise UploadProblem(422, f"form field 'view': expected SA or LA, got {view_field!r}")
        if named_view and named_view != view_field:
            raise UploadProblem(
                422,
                f"form field 'view' is {view_field} but the file name {filename!r} says "
                f"{named_view}",
            )
        view = view_field
    if view is None:
        raise UploadProblem(
            422,
            f"the file name {filename!r} does not tell the view (no _SA_ or _LA_ token): send "
            "the form field 'view' (SA or LA)",
        )
    if view not in bundle.scorers:
        raise UploadProblem(
            422, f"view {view} is not served (models for: {', '.join(sorted(bundle.scorers))})"
        )
    phase = phase_field or named_phase or "unknown"
    if not _PHASE.fullmatch(phase):
        raise UploadProblem(422, f"form field 'phase': expected {_PHASE.pattern}, got {phase!r}")
    return view, phase


def _asgi_middleware(http: HttpMetrics) -> Any:
    """A middleware class for ``app.add_middleware`` wrapping :meth:`HttpMetrics.middleware`."""

    class _Metrics:
        def __init__(self, app: Any) -> None:
            self._app = http.middleware(app)

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await self._app(scope, receive, send)

    return _Metrics


def _version() -> str:
    from qcloop.monitor import __version__

    return str(__version__)
