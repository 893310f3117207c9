"""One monitor per output folder: an exclusive ``flock`` on ``OUT/.monitor.lock`` held for the
monitor's lifetime. Two monitors on one folder would take the same sequence numbers, overwrite
each other's inputs and truncate each other's ledger lines; the second one is refused instead,
with the first one's process id. The kernel drops the lock when its process dies (``kill -9``
included), so a crash never leaves the folder locked."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from qcloop.monitor.ops.ledger import utc_now

__all__ = ["LOCK_FILE", "OutFolderBusy", "OutLock"]

LOCK_FILE = ".monitor.lock"


class OutFolderBusy(RuntimeError):
    """Another monitor holds the output folder."""


class OutLock:
    """The exclusive lock of one output folder (released by :meth:`release`, or by the end
    of the process)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutFolderBusy(
                f"{out}: in use by another qcloop monitor ({holder}); stop it, or give this "
                "one another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {utc_now()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Let another monitor take the folder."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
