"""A metrics exporter that writes every qcloop event as one JSON line.

Each line is the event's JSON form (``event.to_dict()``, with its ``kind``) plus ``logged_at``
(UTC, ISO 8601) and ``service`` (the id of the service it belongs to; ``null`` for a batch
command). Services add a ``service_started`` and a ``service_stopped`` line around their events.

Where lines go:

* the file named by the environment variable ``QCLOOP_TENT_EVENTS``, when it is set: every
  event of the process, batch commands (``qcloop assess``, ``refine``) included;
* otherwise ``<OUT>/events.jsonl`` of a service with an output folder (``qcloop monitor``);
  an event that names no service goes to every such service running in the process;
* otherwise nowhere: installed but not asked for, the exporter writes nothing.

Each line is appended with one ``write`` on a file opened in append mode, so concurrent writers
(the monitor's threads, another process on the same file) never interleave within a line.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qcloop.monitor import ServiceInfo
from qcloop.monitor.core.events import Event

__all__ = ["EVENTS_ENV", "EVENTS_FILE", "JsonlEventLog"]

#: Environment variable naming one file for every event of the process.
EVENTS_ENV = "QCLOOP_TENT_EVENTS"
#: The file in a service's output folder.
EVENTS_FILE = "events.jsonl"


def _now() -> str:
    """The current UTC time, ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class JsonlEventLog:
    """Routes events to JSON Lines files: the ``QCLOOP_TENT_EVENTS`` file, else the output
    folder of the service that emitted them."""

    def __init__(self) -> None:
        self._services: dict[str, Path] = {}
        self._lock = threading.Lock()

    @staticmethod
    def env_path() -> Path | None:
        """The file named by ``QCLOOP_TENT_EVENTS`` (read at each call), or ``None``."""
        value = os.environ.get(EVENTS_ENV, "").strip()
        return Path(value) if value else None

    def service_started(self, service: ServiceInfo) -> None:
        """Start routing ``service``'s events (to its ``OUT/events.jsonl`` when it has an
        output folder) and log its start."""
        if service.out is not None:
            self._services[service.id] = Path(service.out) / EVENTS_FILE
        self._write_service("service_started", service)

    def service_stopped(self, service: ServiceInfo) -> None:
        """Log ``service``'s stop and forget it."""
        self._write_service("service_stopped", service)
        self._services.pop(service.id, None)

    def write(self, event: Event) -> None:
        """Append ``event`` to each file it is routed to."""
        self._record(event.to_dict(), getattr(event, "service", None))

    def _write_service(self, kind: str, service: ServiceInfo) -> None:
        """Append a ``service_started`` / ``service_stopped`` line for ``service``."""
        entry = {
            "kind": kind,
            "service_kind": service.kind,
            "out": None if service.out is None else str(service.out),
            "endpoints": dict(service.endpoints),
        }
        self._record(entry, service.id)

    def _record(self, entry: dict[str, Any], service_id: str | None) -> None:
        """Append ``entry``, stamped with its service and the time, wherever it is routed."""
        for target_id, path in self._targets(service_id):
            self._append(path, {**entry, "service": target_id, "logged_at": _now()})

    def _targets(self, service_id: str | None) -> list[tuple[str | None, Path]]:
        """(service id written on the line, file) for an event of ``service_id``."""
        env = self.env_path()
        if env is not None:
            return [(service_id, env)]
        if service_id is None:
            return list(self._services.items())
        path = self._services.get(service_id)
        return [] if path is None else [(service_id, path)]

    def _append(self, path: Path, entry: dict[str, Any]) -> None:
        """Append one JSON line with a single ``write`` in append mode."""
        data = (json.dumps(entry, default=str) + "\n").encode("utf-8")
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, data)
                while written < len(data):  # a regular file takes it whole; be safe anyway
                    written += os.write(fd, data[written:])
            finally:
                os.close(fd)
