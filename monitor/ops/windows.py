"""The rolling window of every view a service scores, owned by the core and published as
``WindowChanged`` events.

A service (``qcloop monitor``, ``qcloop serve``) keeps exactly one :class:`ViewWindows`; its
drift policy reads the windows' statistics from it, and exporters receive every change through
the ``on_window_changed`` hook (they keep no window of their own)::

    windows = ViewWindows(cfg.monitoring.window, pm=pm, service=service.id)
    windows.restore("SA", [(False, 0.91), (True, 0.42)], model_version="3",
                    reference_median=0.88)          # cause "restore": refilled after a restart
    windows.add("SA", ood=True, pdc=0.40)           # cause "case": one scored case entered
    windows.stats("SA")                             # WindowStats(n=3, ood_fraction=..., ...)
    windows.reset("SA", model_version="4", reference_median=0.9)   # cause "reset": new model

Each change emits one event, in the order the changes happened (the object is thread-safe), with
the window's statistics, the view's reference median and the version of the model the window
belongs to. A case may carry a payload (``item``), returned by :meth:`ViewWindows.items`: the
monitor keeps each case's ledger entry there, so the window it refines on is this same window.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from qcloop.monitor.core.events import WindowChanged, WindowStats
from qcloop.monitor.ops.drift import RollingWindow

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.plugin_manager import QcloopPluginManager

__all__ = ["ViewWindows"]

UNREGISTERED = "unregistered"


@dataclass
class _View:
    window: RollingWindow
    model_version: str = UNREGISTERED
    reference_median: float | None = None


class ViewWindows:
    """One rolling window per view, publishing each change as a ``WindowChanged`` event.

    Args:
        size: cases per window (``monitoring.window``).
        pm: the plugin manager events go through (``None``: the process-wide one, looked up at
            each change).
        service: the emitting service's id (``ServiceInfo.id``), copied into every event.
    """

    def __init__(
        self, size: int, *, pm: QcloopPluginManager | None = None, service: str | None = None
    ) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size = int(size)
        self.service = service
        self._pm = pm
        self._views: dict[str, _View] = {}
        self._lock = threading.RLock()

    def __contains__(self, view: object) -> bool:
        return view in self._views

    def __len__(self) -> int:
        return len(self._views)

    def views(self) -> list[str]:
        """The views that have a window, sorted."""
        with self._lock:
            return sorted(self._views)

    def add(
        self, view: str, ood: bool, pdc: float, item: Any = None, est: float | None = None
    ) -> WindowStats:
        """One scored case enters ``view``'s window (the oldest drops out when full; ``est``:
        its decision est_dice, when the run has an estimator); emits cause ``"case"`` and
        returns the window's statistics."""
        with self._lock:
            state = self._view(view)
            state.window.add(ood, pdc, item, est)
            return self._publish(view, state, "case")

    def reset(
        self, view: str, *, model_version: str, reference_median: float | None
    ) -> WindowStats:
        """Empty ``view``'s window because a new model (``model_version``, with its
        ``reference_median``) took over; emits cause ``"reset"``."""
        with self._lock:
            state = self._view(view)
            state.window.clear()
            state.model_version, state.reference_median = str(model_version), reference_median
            return self._publish(view, state, "reset")

    def restore(
        self,
        view: str,
        pairs: Iterable[tuple[bool, float]],
        *,
        model_version: str,
        reference_median: float | None,
        items: Sequence[Any] | None = None,
        ests: Sequence[float | None] | None = None,
    ) -> WindowStats:
        """Refill ``view``'s window with (OoD flag, decision pDC) pairs, oldest first (only the
        last ``size`` stay), with their payloads ``items`` when given; emits cause
        ``"restore"``. A restarted service calls it once per view (with no pair: an empty
        window), which also announces the view's model and reference. ``ests``: the cases'
        decision est_dice, when known."""
        pairs = list(pairs)
        if items is not None and len(items) != len(pairs):
            raise ValueError(f"{view}: {len(items)} items for {len(pairs)} window cases")
        if ests is not None and len(ests) != len(pairs):
            raise ValueError(f"{view}: {len(ests)} estimates for {len(pairs)} window cases")
        with self._lock:
            state = self._view(view)
            state.window.clear()
            for i, (ood, pdc) in enumerate(pairs):
                item = None if items is None else items[i]
                state.window.add(ood, pdc, item, None if ests is None else ests[i])
            state.model_version, state.reference_median = str(model_version), reference_median
            return self._publish(view, state, "restore")

    def stats(self, view: str) -> WindowStats:
        """The statistics of ``view``'s window now (an empty window for an unknown view)."""
        with self._lock:
            state = self._views.get(view)
            return state.window.stats() if state is not None else WindowStats(0, 0.0, None)

    def items(self, view: str) -> list[Any]:
        """The payloads of ``view``'s window cases, oldest first."""
        with self._lock:
            state = self._views.get(view)
            return state.window.items() if state is not None else []

    def count(self, view: str) -> int:
        """How many cases ``view``'s window holds."""
        with self._lock:
            state = self._views.get(view)
            return len(state.window) if state is not None else 0

    def reference_median(self, view: str) -> float | None:
        """The reference median decision pDC ``view``'s window is compared with."""
        with self._lock:
            state = self._views.get(view)
            return state.reference_median if state is not None else None

    def _view(self, view: str) -> _View:
        state = self._views.get(view)
        if state is None:
            state = self._views[view] = _View(RollingWindow(self.size))
        return state

    def _publish(
        self, view: str, state: _View, cause: Literal["case", "reset", "restore"]
    ) -> WindowStats:
        """Emit the view's ``WindowChanged`` (called holding the lock, so events keep the
        order of the changes); returns the statistics."""
        stats = state.window.stats()
        event = WindowChanged(
            view=view,
            stats=stats,
            reference_median=state.reference_median,
            cause=cause,
            model_version=state.model_version,
            service=self.service,
        )
        self._plugin_manager().emit(event)
        return stats

    def _plugin_manager(self) -> QcloopPluginManager:
        if self._pm is not None:
            return self._pm
        from qcloop.monitor.core.plugin_manager import get_plugin_manager

        return get_plugin_manager()
