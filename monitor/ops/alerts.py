"""The monitor's drift alerts, per view: its own policy judged after every case, alerts received
from Alertmanager, the cooldown between alerts, and the coalescing of alerts into one queued
refinement.

After an alert, the same view raises no new alert for ``cooldown_s`` seconds and until
``min_cases`` new cases were scored; an alert that arrives while a refinement is queued is
coalesced into it. Each alert is appended to the ledger (its dict form, as the refinement's
``alert.json`` holds it) and broadcast as a typed :class:`~qcloop.monitor.core.events.DriftAlert`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcloop.monitor.core.events import DriftAlert, WindowStats
from qcloop.monitor.ops.drift import DriftLimits, FlagReference, judge_drift
from qcloop.monitor.ops.ledger import Ledger, ViewHistory, utc_now

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.plugin_manager import QcloopPluginManager

log = logging.getLogger(__name__)

__all__ = ["SOURCE_ALERTMANAGER", "SOURCE_QCLOOP", "AlertPolicy", "AlertState", "alert_event"]

SOURCE_QCLOOP = "qcloop"
SOURCE_ALERTMANAGER = "alertmanager"


@dataclass
class AlertState:
    """One view's alert state: when it last alerted, cases scored since, and the alert whose
    refinement is queued (``None``: none)."""

    last_alert_time: float | None = None
    cases_since_alert: int = 0
    pending: dict[str, Any] | None = None


def alert_event(alert: dict[str, Any], service: str | None = None) -> DriftAlert:
    """The typed event of an alert dict (as the ledger stores it)."""
    return DriftAlert(
        view=str(alert["view"]),
        source=str(alert["source"]),
        reasons=tuple(alert.get("reasons") or ()),
        window=WindowStats(**alert["window"]),
        reference_median=alert.get("reference_median"),
        model=dict(alert.get("model") or {}),
        time=str(alert["time"]),
        limits=dict(alert.get("limits") or {}),
        labels=dict(alert.get("labels") or {}),
        service=service,
    )


def _alertmanager_reason(am_alert: dict[str, Any]) -> str:
    """One line for an Alertmanager alert: its name and, when given, its summary."""
    labels = am_alert.get("labels", {})
    annotations = am_alert.get("annotations")
    summary = annotations.get("summary") if isinstance(annotations, dict) else None
    return f"Alertmanager: {labels.get('alertname', '?')} firing" + (
        f" ({summary})" if summary else ""
    )


class AlertPolicy:
    """Raises, receives and coalesces the drift alerts of the served views (thread-safe: the
    webhook's thread hands in Alertmanager's alerts).

    Args:
        limits: the drift policy's limits.
        ledger: where alerts are recorded.
        cooldown_s: seconds after an alert before the next one of the same view.
        refine_on_alert: whether an alert queues a refinement.
        pm: the plugin manager alerts are broadcast through.
        service: the monitor's service id (copied into the events).
        clock: wall clock in seconds.
    """

    def __init__(
        self,
        limits: DriftLimits,
        ledger: Ledger,
        *,
        cooldown_s: float,
        refine_on_alert: bool,
        pm: QcloopPluginManager,
        service: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits
        self.ledger = ledger
        self.cooldown_s = float(cooldown_s)
        self.refine_on_alert = bool(refine_on_alert)
        self.service = service
        self._pm = pm
        self._clock = clock
        self._lock = threading.RLock()
        self.states: dict[str, AlertState] = {}

    # ------------------------------------------------------------------ state

    def restore(self, view: str, history: ViewHistory) -> None:
        """The view's state after a restart: its last alert, and the refinement that alert
        queued when it never finished."""
        state = AlertState()
        if history.last_alert is not None:
            state.last_alert_time = history.last_alert_time
            state.cases_since_alert = history.cases_since_alert
            state.pending = history.unfinished_alert(view)
            if state.pending is not None:
                log.warning("%s: refinement requested before a restart; queued again", view)
        with self._lock:
            self.states[view] = state

    def new_model(self, view: str) -> None:
        """A new model serves ``view``: counting starts again, the cooldown goes on."""
        with self._lock:
            old = self.states.get(view) or AlertState()
            self.states[view] = AlertState(last_alert_time=old.last_alert_time)

    def pending(self, view: str) -> dict[str, Any] | None:
        """The alert whose refinement is queued for ``view``."""
        with self._lock:
            return self.states[view].pending

    def done(self, view: str) -> None:
        """The queued refinement of ``view`` ran (whatever its outcome)."""
        with self._lock:
            self.states[view].pending = None

    # ------------------------------------------------------------------ alerts

    def after_case(
        self,
        view: str,
        stats: WindowStats,
        reference_median: float | None,
        model: dict[str, str],
        *,
        flags: FlagReference | None = None,
    ) -> dict[str, Any] | None:
        """Judge ``view``'s window after a case entered it (``flags``: the model's reference
        flag rate, for the binomial rule); returns the alert raised, if any."""
        with self._lock:
            state = self.states[view]
            state.cases_since_alert += 1
            decision = judge_drift(stats, reference_median, self.limits, flags)
            if not decision.alert or not self._may_alert(state):
                return None
            alert = {
                "view": view,
                "source": SOURCE_QCLOOP,
                "reasons": list(decision.reasons),
                "window": decision.stats.to_dict(),
                "reference_median": decision.reference_median,
                "limits": {
                    "min_cases": self.limits.min_cases,
                    "rule": self.limits.rule if flags is not None else "fixed",
                    "alert_alpha": self.limits.alert_alpha,
                    "reference_flags": None if flags is None else [flags.flagged, flags.cases],
                    "ood_fraction_limit": self.limits.ood_fraction_limit,
                    "median_pdc_shift_limit": self.limits.median_pdc_shift_limit,
                },
                "model": model,
                "time": utc_now(),
            }
            self._raise(view, alert)
        return alert

    def receive(
        self,
        view: str,
        am_alert: dict[str, Any],
        stats: WindowStats,
        reference_median: float | None,
        model: dict[str, str],
    ) -> str:
        """Handle a firing alert from Alertmanager for a served ``view``; returns the outcome:
        ``queued``, ``coalesced`` (a refinement is pending), ``cooldown``, ``too few cases`` /
        ``no new evidence`` (see :meth:`_too_little_evidence`) or ``logged`` (when alerts do not
        refine)."""
        with self._lock:
            state = self.states[view]
            if state.pending is not None:
                return "coalesced"
            if (
                state.last_alert_time is not None
                and self._clock() - state.last_alert_time < self.cooldown_s
            ):
                return "cooldown"
            evidence = self._too_little_evidence(state, stats)
            if evidence is not None:
                return evidence
            alert = {
                "view": view,
                "source": SOURCE_ALERTMANAGER,
                "reasons": [_alertmanager_reason(am_alert)],
                "window": stats.to_dict(),
                "reference_median": reference_median,
                "labels": am_alert.get("labels", {}),
                "model": model,
                "time": utc_now(),
            }
            self._raise(view, alert)
        return "queued" if self.refine_on_alert else "logged (refine_on_alert is off)"

    def _too_little_evidence(self, state: AlertState, stats: WindowStats) -> str | None:
        """Why an Alertmanager alert cannot refine now (a window smaller than ``min_cases``,
        or fewer than ``min_cases`` new cases since the last alert: an Alertmanager repeat of an
        alert already acted on), else None."""
        n = self.limits.min_cases
        if stats.n < n:
            return f"too few cases: the window holds {stats.n} of monitoring.min_cases {n}"
        if state.last_alert_time is not None and state.cases_since_alert < n:
            return (
                f"no new evidence: {state.cases_since_alert} case(s) since the last alert, "
                f"monitoring.min_cases is {n}"
            )
        return None

    def _may_alert(self, state: AlertState) -> bool:
        if state.pending is not None:
            return False
        if state.last_alert_time is None:
            return True
        cooled = self._clock() - state.last_alert_time >= self.cooldown_s
        return cooled and state.cases_since_alert >= self.limits.min_cases

    def _raise(self, view: str, alert: dict[str, Any]) -> None:
        """Record an alert, queue its refinement, broadcast it (called holding the lock, so
        that concurrent alerts of one view are coalesced)."""
        state = self.states[view]
        state.last_alert_time = self._clock()
        state.cases_since_alert = 0
        if self.refine_on_alert:
            state.pending = alert
        self.ledger.append(
            {
                "event": "alert",
                "view": view,
                "source": alert["source"],
                "refine": self.refine_on_alert,
                "seq": self.ledger.seq,
                "unix_time": state.last_alert_time,
                "time": alert["time"],
                "alert": alert,
            }
        )
        log.warning("%s: drift alert (%s): %s", view, alert["source"], "; ".join(alert["reasons"]))
        self._pm.emit(alert_event(alert, self.service))
