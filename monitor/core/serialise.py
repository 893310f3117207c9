"""Small helpers for what the core writes as JSON: timestamps and JSON-ready values."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-12-02T05:45:33+00:00``)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: arrays through ``tolist()``, anything else unknown as ``str``."""
    return json.loads(
        json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )
