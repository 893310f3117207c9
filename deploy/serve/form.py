"""Reading the multipart request of ``POST /v1/segment``: the body limit while it streams in,
the ``file`` part, and the view and phase from the form fields and the client's file name."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from fastapi import HTTPException, Request
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from qcloop.deploy.serve.schemas import PHASE
from qcloop.deploy.serve.upload import UploadProblem, names_from_filename

__all__ = ["client_name", "read_form", "upload_part", "view_and_phase"]


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


async def read_form(request: Request, max_body: int, too_large: str) -> FormData:
    """The multipart form, received with at most ``max_body`` bytes (413 ``too_large`` past
    that) and one file part; 400 for a client that disconnects or a malformed body."""
    try:
        return await _limited(request, max_body).form(max_files=1, max_fields=4, max_part_size=4096)
    except _BodyTooLarge as exc:
        raise HTTPException(413, too_large) from exc
    except ClientDisconnect as exc:
        raise HTTPException(400, "the client disconnected during the upload") from exc
    except StarletteHTTPException as exc:
        raise HTTPException(400, f"malformed multipart body: {exc.detail}") from exc


def upload_part(form: FormData) -> UploadFile:
    """The form's single ``file`` part (400 when missing, not a file, or repeated)."""
    upload = form.get("file")
    if upload is None:
        raise HTTPException(400, "missing form field 'file' (the NIfTI image)")
    if not isinstance(upload, UploadFile):
        raise HTTPException(400, "form field 'file' must be a file part (with a filename)")
    if len(form.getlist("file")) != 1:
        raise HTTPException(400, "send exactly one 'file' part")
    return upload


def client_name(filename: str | None) -> str | None:
    """The client's file name without any folder, shortened: recorded, never used as a path."""
    if not filename:
        return None
    return re.split(r"[\\/]", filename)[-1][:200] or None


def view_and_phase(form: Any, filename: str | None, served: Collection[str]) -> tuple[str, str]:
    """The case's view and phase from the form fields and the client's file name; the view
    must be one of the ``served`` views."""
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
    if view not in served:
        raise UploadProblem(
            422, f"view {view} is not served (models for: {', '.join(sorted(served))})"
        )
    phase = phase_field or named_phase or "unknown"
    if not PHASE.fullmatch(phase):
        raise UploadProblem(422, f"form field 'phase': expected {PHASE.pattern}, got {phase!r}")
    return view, phase
