"""The routes of ``qcloop serve``: liveness and readiness, the models in use, segmentation and
the one-time mask links (:func:`add_routes`). Each handler finds the app's
:class:`~.service.ServeService` in ``request.app.state.service``; the protected ones depend on
:func:`~.auth.require_key`."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import uuid
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response

from qcloop.deploy.serve.auth import require_key
from qcloop.deploy.serve.form import client_name, read_form, upload_part, view_and_phase
from qcloop.deploy.serve.schemas import (
    SEGMENT_BODY,
    TOKEN_PATTERN,
    ErrorResponse,
    HealthResponse,
    InlineFigure,
    InlineMask,
    LinkMask,
    ModelsResponse,
    ReadyResponse,
    SegmentResponse,
    ViewModels,
    error_responses,
)
from qcloop.deploy.serve.service import ServeService
from qcloop.deploy.serve.upload import UploadProblem
from qcloop.monitor.core.events import CaseFailed

__all__ = ["add_routes"]

_PROTECTED = [Depends(require_key)]


def _service(request: Request) -> ServeService:
    return request.app.state.service


async def healthz() -> HealthResponse:
    """Liveness: the process answers."""
    return HealthResponse()


async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 once models are loaded, else 503."""
    manager = _service(request).manager
    if manager.bundle is None:
        reason = "models are loading"
        if manager.last_error:
            reason = "models failed to load (see the server log)"
        return JSONResponse(ReadyResponse(ready=False, reason=reason).model_dump(), 503)
    return JSONResponse(ReadyResponse(ready=True).model_dump(), 200)


async def models(request: Request) -> ModelsResponse:
    """The models in use: versions, runtime and execution providers read back per view."""
    manager = _service(request).manager
    bundle = manager.bundle
    described = bundle.describe() if bundle is not None else {}
    return ModelsResponse(
        ready=bundle is not None,
        source=manager.source.describe(),
        runtime=manager.runtime,
        fingerprint=described.get("fingerprint"),
        loaded_at=described.get("loaded_at"),
        reloads=manager.reloads,
        reload_failures=manager.reload_failures,
        last_reload_error=manager.last_error,
        views={v: ViewModels(**d) for v, d in described.get("views", {}).items()},
    )


def _refuse_early(request: Request, service: ServeService, max_body: int, too_large: str) -> None:
    """Refuse what can be refused before admission: not multipart (415), a declared body over
    the limit (413), models not loaded yet (503)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise HTTPException(
            415, f"expected multipart/form-data with a 'file' part, got {content_type or 'none'}"
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body:
        raise HTTPException(413, too_large)
    if service.manager.bundle is None:
        raise HTTPException(503, "models are loading", headers={"Retry-After": "5"})


def _mask(request: Request, service: ServeService, payload: bytes, kind: str) -> Any:
    """The mask as the client asked: inline (base64) or a one-time link."""
    if kind == "link":
        token = service.masks.put(payload)
        return LinkMask(
            url=str(request.url_for("fetch_mask", token=token)), expires_in_s=service.masks.ttl_s
        )
    return InlineMask(
        filename="mask.nii.gz",
        media_type="application/gzip",
        base64=base64.b64encode(payload).decode("ascii"),
    )


async def segment(
    request: Request,
    mask: Annotated[
        Literal["inline", "link"],
        Query(description="inline: the mask as base64 NIfTI; link: a one-time URL."),
    ] = "inline",
    figure: Annotated[
        bool,
        Query(description="Also return the case's QC figure (PNG; needs the report extra)."),
    ] = False,
) -> SegmentResponse:
    """Segment one NIfTI volume, run QC and selection; the QC record, the mask and, with
    ``?figure=1``, the QC figure."""
    service = _service(request)
    if figure and importlib.util.find_spec("matplotlib") is None:
        raise HTTPException(501, "?figure=1 needs matplotlib: pip install 'qcloop[report]'")
    serving = service.cfg.serving
    too_large = f"upload larger than {serving.max_upload_mb:g} MB (serving.max_upload_mb)"
    max_body = int(serving.max_upload_mb * 1024 * 1024)
    _refuse_early(request, service, max_body, too_large)
    bundle = service.manager.bundle
    limiter = service.limiter
    # the body first, within its deadline: a slow client never holds a processing slot
    form = await _read_form_in_time(request, service, max_body, too_large)
    if not limiter.try_admit():
        await form.close()
        raise HTTPException(
            429,
            f"busy: {limiter.workers} request(s) running and the queue is full; retry later",
            headers={"Retry-After": str(limiter.retry_after_s())},
        )
    try:
        upload = upload_part(form)
        view, phase = view_and_phase(form, upload.filename, bundle.scorers)
        request_id = uuid.uuid4().hex
        name = client_name(upload.filename)
        record, payload, png = await limiter.run(
            lambda: service.process(bundle, upload, view, phase, request_id, name, figure)
        )
    except UploadProblem as exc:
        raise HTTPException(exc.status, exc.reason) from exc
    finally:
        limiter.release()
        await form.close()
    return SegmentResponse(
        request_id=request_id,
        record=record,
        mask=_mask(request, service, payload, mask),
        figure=None if png is None else InlineFigure(base64=base64.b64encode(png).decode()),
    )


async def _read_form_in_time(request: Request, service: Any, max_body: int, too_large: str) -> Any:
    """The request's form, received within ``serving.upload_timeout_s`` (408, counted as a
    ``CaseFailed`` of stage ``upload_timeout``, past it)."""
    timeout = service.cfg.serving.upload_timeout_s
    try:
        return await asyncio.wait_for(read_form(request, max_body, too_large), timeout)
    except TimeoutError as exc:
        reason = f"the request body did not arrive within {timeout:g} s (serving.upload_timeout_s)"
        service.events.emit(CaseFailed("upload_timeout", reason, source="upload"))
        raise HTTPException(408, reason) from exc


async def fetch_mask(
    request: Request,
    token: Annotated[str, PathParam(pattern=TOKEN_PATTERN)],
) -> Response:
    """The mask of a ``?mask=link`` request (gzipped NIfTI); deleted once fetched."""
    payload = _service(request).masks.take(token)
    if payload is None:
        raise HTTPException(404, "unknown or expired mask token (a mask is fetched once)")
    return Response(
        payload,
        media_type="application/gzip",
        headers={"Content-Disposition": 'attachment; filename="mask.nii.gz"'},
    )


def add_routes(app: FastAPI) -> None:
    """Add every route of the API to ``app``, in the order of its OpenAPI document."""
    app.add_api_route("/healthz", healthz, response_model=HealthResponse, tags=["service"])
    app.add_api_route(
        "/readyz",
        readyz,
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse}},
        tags=["service"],
    )
    app.add_api_route(
        "/v1/models",
        models,
        response_model=ModelsResponse,
        dependencies=_PROTECTED,
        responses=error_responses(401, 403),
        tags=["models"],
    )
    app.add_api_route(
        "/v1/segment",
        segment,
        methods=["POST"],
        response_model=SegmentResponse,
        dependencies=_PROTECTED,
        openapi_extra=SEGMENT_BODY,
        responses={
            **error_responses(400, 401, 403, 408, 413, 415, 422, 429, 501, 503),
            429: {
                "model": ErrorResponse,
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            },
        },
        tags=["segmentation"],
    )
    app.add_api_route(
        "/v1/masks/{token}",
        fetch_mask,
        name="fetch_mask",
        dependencies=_PROTECTED,
        response_class=Response,
        responses={
            200: {"content": {"application/gzip": {"schema": {"type": "string"}}}},
            **error_responses(401, 403, 404, 422),
        },
        tags=["segmentation"],
    )
