"""Credentials out of what qcloop writes and logs: a URI's user information
(``https://user:secret@host``) and query values named like secrets (``?token=...``) become
``REDACTED`` in every configuration written to a run folder (and so in every registered
version) and in the parameters logged to a tracker. Credentials belong in the backend's own
environment variables (MLflow: ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or
``MLFLOW_TRACKING_TOKEN``), never in a configuration file."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["REDACTED", "redact", "redact_uri"]

REDACTED = "REDACTED"
_SECRET_KEY = re.compile(r"token|passw|secret|key|sig|credential|auth", re.IGNORECASE)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def redact_uri(value: str) -> str:
    """``value`` with a URI's user information and secret-named query values replaced."""
    if not _URI.match(value):
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(_SECRET_KEY.search(k) for k, _ in pairs)
    if "@" not in parts.netloc and not secret_query:
        return value  # unchanged, to the character (sqlite:///x keeps its slashes)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if secret_query:
        query = urlencode([(k, REDACTED if _SECRET_KEY.search(k) else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(obj: Any) -> Any:
    """``obj`` (JSON-like: dicts, lists, strings...) with every URI string redacted."""
    if isinstance(obj, str):
        return redact_uri(obj)
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    return obj
