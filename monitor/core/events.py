"""Typed events: what the core tells plugins through the event hooks.

Each event is a frozen dataclass whose fields are plain values (``to_dict`` gives the JSON form),
so an exporter (Prometheus, a JSON-lines file, OpenTelemetry) or a piece of automation depends
on these types only, never on the core's internals. Events are emitted after the work they
report is done, and a subscriber that raises never stops that work
(:meth:`~qcloop.monitor.core.plugin_manager.QcloopPluginManager.emit` logs and counts it).

``service`` names the service instance that emitted an event (:attr:`ServiceInfo.id`), or is
``None`` for a batch command (``qcloop assess``, ``refine``, ``models``): an exporter that keeps
per-service state (one Prometheus registry per ``qcloop serve`` app, say) routes by it.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

__all__ = [
    "CASE_FAILURE_STAGES",
    "AdmissionChanged",
    "CaseFailed",
    "CaseScored",
    "DriftAlert",
    "Event",
    "FeedbackReceived",
    "ModelRefined",
    "ModelVersionPromoted",
    "ModelVersionRegistered",
    "ModelsLoaded",
    "ServiceInfo",
    "WindowChanged",
    "WindowStats",
]

#: Where a case can fail; a bounded set, so exporters may use it as a label.
CASE_FAILURE_STAGES: tuple[str, ...] = (
    "read",
    "validate",
    "score",
    "write",
    "internal",  # anything else that failed while the monitor processed a file
    "upload_timeout",  # a serve client that did not send its body in time
)

ServiceKind = Literal["monitor", "serve"]


def _plain(value: Any) -> Any:
    """``value`` with dataclasses, tuples and paths turned into JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class Event:
    """Base of the events: a ``kind`` (the hook's noun) and a JSON-ready :meth:`to_dict`."""

    kind: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-serialisable dict, with its ``kind`` first."""
        return {"kind": self.kind, **_plain(self)}


@dataclass(frozen=True)
class WindowStats:
    """A rolling window's summary: ``n`` cases, the fraction flagged OoD, the median decision
    pDC (``None`` when the window is empty) and the median calibrated ``est_dice`` of the
    decision structure (``None`` when no case of the window carries an estimate)."""

    n: int
    ood_fraction: float
    median_pdc: float | None
    median_est: float | None = None

    def __post_init__(self) -> None:
        if self.n < 0 or not 0.0 <= self.ood_fraction <= 1.0:
            raise ValueError(f"invalid window statistics: n={self.n}, fraction={self.ood_fraction}")
        for name in ("median_pdc", "median_est"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"non-finite window {name} {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``median_est`` only when the window has estimates, so consumers
        written before it see the same dict)."""
        out: dict[str, Any] = {
            "n": self.n,
            "ood_fraction": self.ood_fraction,
            "median_pdc": self.median_pdc,
        }
        if self.median_est is not None:
            out["median_est"] = self.median_est
        return out


@dataclass
class ServiceInfo:
    """A long-running service (``qcloop monitor`` or ``qcloop serve``), as plugins see it.

    Attributes:
        kind: ``"monitor"`` or ``"serve"``.
        config: the service's :class:`~qcloop.monitor.core.config.QcloopConfig` (its
            ``monitoring`` section has the window size and the metrics endpoint's address).
        app: the service's ASGI app (a FastAPI app for ``serve``) before it starts, so an
            exporter may add routes or middleware; ``None`` when the service has none.
        out: the folder the service writes to (the monitor's OUT), else ``None``.
        id: unique per service instance; events carry it as ``service``.
        endpoints: what plugins opened for this service, name -> URL (an exporter's
            ``/metrics``); the service prints them.
    """

    kind: ServiceKind
    config: Any
    app: Any = None
    out: Path | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    endpoints: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CaseScored(Event):
    """A case was scored: its QC record, exactly as written to ``records.jsonl``.

    The record holds the subject, view and phase, per candidate the pseudo-metrics of every
    structure, the fences, the OoD flag, the selection and the ``model`` identity; services add
    ``runtime`` and ``latency_s``.
    """

    record: dict[str, Any]
    service: str | None = None
    kind: ClassVar[str] = "case_scored"

    @property
    def view(self) -> str:
        """The case's view (``"SA"``/``"LA"``)."""
        return str(self.record.get("view", "unknown"))

    @property
    def model_version(self) -> str:
        """The version of the model that scored it (``"unregistered"`` for a plain run)."""
        return str((self.record.get("model") or {}).get("version", "unregistered"))


@dataclass(frozen=True)
class CaseFailed(Event):
    """A case could not be scored: the stage (one of :data:`CASE_FAILURE_STAGES`), the
    reason, and the input it came from (a file name, or ``"upload"``)."""

    stage: str
    reason: str
    source: str
    view: str | None = None
    service: str | None = None
    kind: ClassVar[str] = "case_failed"

    def __post_init__(self) -> None:
        if self.stage not in CASE_FAILURE_STAGES:
            raise ValueError(f"stage must be one of {CASE_FAILURE_STAGES}, got {self.stage!r}")


@dataclass(frozen=True)
class WindowChanged(Event):
    """A view's rolling window changed: a case entered it, it was reset (a new model took over)
    or restored (a restarted monitor refilled it from its ledger).

    Attributes:
        view: the view.
        stats: the window's statistics now.
        reference_median: the median decision pDC of the reference cases, when known.
        cause: ``"case"``, ``"reset"`` or ``"restore"``.
        model_version: the version of the model the window belongs to.
    """

    view: str
    stats: WindowStats
    reference_median: float | None
    cause: Literal["case", "reset", "restore"]
    model_version: str = "unregistered"
    service: str | None = None
    kind: ClassVar[str] = "window_changed"


@dataclass(frozen=True)
class DriftAlert(Event):
    """A drift alert, raised by the monitor's own policy (``source="qcloop"``) or received from
    Alertmanager (``source="alertmanager"``).

    Attributes:
        view: the view that drifted.
        source: who raised it.
        reasons: one line per broken limit, with its figures.
        window: the window's statistics when it fired.
        reference_median: the reference median decision pDC, when known.
        model: identity of the model serving the view (``name``, ``version``).
        time: UTC time, ISO 8601.
        limits: the policy's limits, by name.
        labels: the Alertmanager alert's labels (empty for the monitor's own alerts).
    """

    view: str
    source: str
    reasons: tuple[str, ...]
    window: WindowStats
    reference_median: float | None
    model: dict[str, str]
    time: str
    limits: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    service: str | None = None
    kind: ClassVar[str] = "drift_alert"


@dataclass(frozen=True)
class FeedbackReceived(Event):
    """A corrected mask arrived for a scored case (``qcloop feedback``, or the monitor's
    ``corrected/`` folder): the realised Dice/HD of the mask that was served, beside what QC
    estimated for it, per structure (``{"RV": {"dice", "hd_mm", "pdc", "phd_mm"}, ...}``),
    whether QC had flagged the case and whether it failed (decision structure's realised Dice
    below 0.8)."""

    view: str
    case_id: str
    scores: dict[str, dict[str, float]]
    flagged: bool
    failed: bool
    service: str | None = None
    kind: ClassVar[str] = "feedback_received"


@dataclass(frozen=True)
class ModelRefined(Event):
    """A refiner produced a new model set for ``view`` in ``run_dir``; ``summary`` holds the
    window's case and OoD counts, the refiner's name and the time it took."""

    view: str
    run_dir: str
    summary: dict[str, Any]
    service: str | None = None
    kind: ClassVar[str] = "model_refined"


@dataclass(frozen=True)
class ModelVersionRegistered(Event):
    """A model version was registered (``name``, ``version``) with its lineage ``tags``."""

    name: str
    version: str
    tags: dict[str, str]
    service: str | None = None
    kind: ClassVar[str] = "model_version_registered"


@dataclass(frozen=True)
class ModelVersionPromoted(Event):
    """An alias (``champion``, ``challenger``) moved to ``version`` of ``name``, from
    ``previous_version`` (``None`` when the alias was new)."""

    name: str
    version: str
    alias: str
    previous_version: str | None
    service: str | None = None
    kind: ClassVar[str] = "model_version_promoted"


@dataclass(frozen=True)
class ModelsLoaded(Event):
    """A service loaded its models (at start, or on a reload when the champion moved).

    Attributes:
        views: per view, ``name``, ``version``, ``runtime`` and ``providers``; empty when the
            load failed.
        outcome: ``"ok"`` or ``"failed"``.
        reload: whether models were already being served (a swap, not the first load).
        error: why the load failed.
    """

    views: dict[str, dict[str, Any]]
    outcome: Literal["ok", "failed"] = "ok"
    reload: bool = False
    error: str | None = None
    service: str | None = None
    kind: ClassVar[str] = "models_loaded"


@dataclass(frozen=True)
class AdmissionChanged(Event):
    """The work queue of a service changed: requests ``running`` now, ``waiting`` for a
    worker, and whether this change is a request ``rejected`` because the queue was full."""

    running: int
    waiting: int
    rejected: bool = False
    service: str | None = None
    kind: ClassVar[str] = "admission_changed"
