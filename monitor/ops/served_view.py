"""One view a monitor serves: its champion, the scorer running it, its reference statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcloop.monitor.core.interfaces import ModelRef
from qcloop.monitor.ops.alerts import AlertPolicy
from qcloop.monitor.ops.drift import FlagReference
from qcloop.monitor.ops.ledger import WindowCase
from qcloop.monitor.ops.windows import ViewWindows

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.ops.scoring import OnlineScorer

__all__ = ["ServedView", "require_estimate"]


def require_estimate(monitoring: Any, scorer: OnlineScorer, champion: ModelRef) -> None:
    """``RunError`` when the drift policy watches the calibrated estimate (``drift_score:
    est``) and ``champion`` has none for the scorer's view."""
    from qcloop.monitor.method.run_folder import RunError

    if monitoring.drift_score == "est" and scorer.estimator is None:
        raise RunError(
            f"{champion.run_dir}/{scorer.view}: monitoring.drift_score is est, and this model "
            f"has no calibrated estimate ({scorer.view}/estimator.json); fit one with qcloop "
            "fit-estimator, or watch pdc"
        )


@dataclass
class ServedView:
    """One served view: its champion model, the scorer running it and its reference median;
    its window and alert state live in the monitor's :class:`ViewWindows` and
    :class:`AlertPolicy`."""

    view: str
    champion: ModelRef
    scorer: OnlineScorer
    reference_median: float | None
    flags: FlagReference | None
    _windows: ViewWindows
    _alerts: AlertPolicy

    @property
    def window(self) -> list[WindowCase]:
        """The cases of the view's rolling window, oldest first."""
        return list(self._windows.items(self.view))

    @property
    def pending(self) -> dict[str, Any] | None:
        """The alert whose refinement is queued, if any."""
        return self._alerts.pending(self.view)
