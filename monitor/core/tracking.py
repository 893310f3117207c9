"""The configured experiment tracker, and the one used when none is configured."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcloop.monitor.core.interfaces import Tracker

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.config import QcloopConfig


class NullTracker:
    """The tracker used when none is configured: accepts every call and records nothing."""

    def start_run(
        self, name: str, tags: dict[str, str] | None = None
    ) -> AbstractContextManager[Any]:
        return nullcontext()

    def log_params(self, params: dict[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        return None

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        return None


def make_tracker(cfg: QcloopConfig) -> Tracker:
    """The configured tracker (``tracking.tracker``), else one that records nothing."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    t = cfg.tracking.tracker
    if t is None:
        return NullTracker()
    return get_plugin_manager().trackers().create(t.name, t.params)


def log_file(tracker: Tracker, path: Path, artifact_path: str | None = None) -> None:
    """Log ``path`` as an artifact when it is a file (a missing optional file is no error)."""
    if path.is_file():
        tracker.log_artifact(str(path), artifact_path)


def run_params(cfg: QcloopConfig, data: str, views: list[str]) -> dict[str, Any]:
    """A training run's tracked parameters: its configuration with credentials redacted
    (:mod:`qcloop.monitor.core.redact`), its data folder and views."""
    from qcloop.monitor.core.redact import redact

    return {**redact(cfg.model_dump(mode="json")), "data": data, "train_views": ",".join(views)}
