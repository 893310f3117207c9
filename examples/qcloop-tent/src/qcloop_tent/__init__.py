"""qcloop-tent: an outside plugin for qcloop.

It provides a TENT refiner (``tent``), a threshold strategy with a false-alarm guarantee
(``conformal``) and an exporter that writes every event as a JSON line; ``plugin`` holds the
hooks (the ``qcloop`` entry point), the other modules one component each.
"""

from __future__ import annotations

from qcloop_tent.conformal import ConformalFences, ConformalThresholds
from qcloop_tent.exporter import EVENTS_ENV, JsonlEventLog
from qcloop_tent.refiner import TentRefiner

__all__ = [
    "EVENTS_ENV",
    "ConformalFences",
    "ConformalThresholds",
    "JsonlEventLog",
    "TentRefiner",
]
