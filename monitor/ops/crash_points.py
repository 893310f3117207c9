"""Named points where a test can kill the monitor as ``kill -9`` would: set
``QCLOOP_CRASH_AT=<name>`` in the environment of a monitor process and it sends itself SIGKILL
when it reaches that point (no cleanup, no flush, no ``finally``). Unset, a point costs one
dictionary lookup. The names are listed in :data:`POINTS`; tests/test_monitor_crash.py kills a
real ``qcloop monitor`` at each and checks that a restart loses no case and scores none twice."""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "crash_point"]

#: Every crash point, in the order a scored case meets them.
POINTS = (
    "intake.after_record",  # record appended, its ledger entry not yet
    "intake.after_ledger",  # ledger entry appended, nothing moved
    "intake.between_moves",  # sidecar moved, the image not yet
    "reject.after_ledger",  # a rejection recorded, nothing moved
    "reject.between_moves",  # a rejected file's sidecar moved, the file not yet
)


def crash_point(name: str) -> None:
    """Die by SIGKILL here when ``QCLOOP_CRASH_AT`` names this point."""
    if os.environ.get("QCLOOP_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
