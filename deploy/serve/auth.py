"""The API key of ``qcloop serve``: where it comes from, and the check every protected route
depends on (``Authorization: Bearer KEY``, compared in constant time)."""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from qcloop.monitor.core.config import QcloopConfig

__all__ = ["API_KEY_ENV", "MIN_KEY_LENGTH", "read_api_key", "require_key"]

API_KEY_ENV = "QCLOOP_API_KEY"
#: shortest API key accepted (characters).
MIN_KEY_LENGTH = 16
#: the ``Authorization: Bearer`` scheme (shown in the OpenAPI schema); checked by the app.
_BEARER = HTTPBearer(
    auto_error=False, description=f"The API key ({API_KEY_ENV} or serving.api_key_file)."
)


def read_api_key(cfg: QcloopConfig, environ: dict[str, str] | None = None) -> str | None:
    """The API key: ``QCLOOP_API_KEY`` when set, else the file ``serving.api_key_file``.

    Returns ``None`` when neither is set.

    Raises:
        ValueError: the key file cannot be read, or a key is shorter than ``MIN_KEY_LENGTH``.
    """
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


async def require_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
) -> None:
    """Refuse a request without the app's key (401) or with another one (403); an app made
    with ``api_key=None`` (explicit opt-in) lets every request through."""
    api_key: str | None = request.app.state.api_key
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
