"""Named points where a test can kill the monitor as ``kill -9`` would: set
``QCLOOP_CRASH_AT=<name>`` in the environment of a monitor process and it sends itself SIGKILL
when it reaches that point (no cleanup, no flush, no ``finally``). Unset, a point costs one
dictionary lookup. The monitor's names are listed in :data:`POINTS`; tests/test_monitor_crash.py
kills a real ``qcloop monitor`` at each and checks that a restart loses no case and scores none
twice. :data:`WRITE_POINTS` are met by every atomic write (tests/test_ray_engine.py kills a Ray
worker there). With ``QCLOOP_CRASH_ONCE=<file>`` as well, only the first process to reach the
point dies (it creates ``<file>``): a restarted worker gets through."""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "WRITE_POINTS", "crash_point"]

#: Every crash point, in the order a scored case meets them.
POINTS = (
    "intake.after_record",  # record appended, its ledger entry not yet
    "intake.after_ledger",  # ledger entry appended, nothing moved
    "intake.between_moves",  # sidecar moved, the image not yet
    "reject.after_ledger",  # a rejection recorded, nothing moved
    "reject.between_moves",  # a rejected file's sidecar moved, the file not yet
)


#: Points of :func:`qcloop.monitor.core.atomic.atomic_path`.
WRITE_POINTS = ("atomic.before_rename",)  # a temporary file written, not yet renamed


def crash_point(name: str) -> None:
    """Die by SIGKILL here when ``QCLOOP_CRASH_AT`` names this point (only the first time, when
    ``QCLOOP_CRASH_ONCE`` names a marker file)."""
    if os.environ.get("QCLOOP_CRASH_AT") != name:
        return
    once = os.environ.get("QCLOOP_CRASH_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
