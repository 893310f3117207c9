"""The request and response schemas of the ``qcloop serve`` API (its OpenAPI document)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "PHASE",
    "SEGMENT_BODY",
    "TOKEN_PATTERN",
    "ErrorResponse",
    "HealthResponse",
    "InlineFigure",
    "InlineMask",
    "LinkMask",
    "ModelsResponse",
    "ReadyResponse",
    "SegmentResponse",
    "ViewModels",
    "error_responses",
]

#: a phase name: ED, ES or another frame name.
PHASE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
#: a one-time mask token.
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{16,128}$"


class ErrorResponse(BaseModel):
    """An error and its reason."""

    detail: str


class InlineMask(BaseModel):
    """The mask as a base64-encoded gzipped NIfTI file (uint8 labels, the upload's affine)."""

    kind: Literal["inline"] = "inline"
    filename: str
    media_type: str
    base64: str


class InlineFigure(BaseModel):
    """The case's QC figure (image, prediction, QC reconstruction, disagreement) as a
    base64-encoded PNG."""

    filename: str = "qc-figure.png"
    media_type: Literal["image/png"] = "image/png"
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
    figure: InlineFigure | None = Field(
        default=None, description="The QC figure, with ?figure=1 (null otherwise)."
    )


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


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries of error ``codes``, each an :class:`ErrorResponse`."""
    return {code: {"model": ErrorResponse} for code in codes}


#: The multipart body of ``POST /v1/segment`` (read by hand, so described by hand).
SEGMENT_BODY: dict[str, Any] = {
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
                            "pattern": PHASE.pattern,
                            "description": "ED, ES or another frame name (the fences of that "
                            "phase, else the pooled ones); default from the file name.",
                        },
                    },
                }
            }
        },
    }
}
