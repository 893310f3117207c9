"""Durable state of ``qcloop monitor``: append-only JSONL logs (records and the ledger) and
crash-safe moves of input files.

Each line of a :class:`JsonlLog` is written with one ``write`` of a whole line followed by
``fsync``. Opening a log repairs it: a last line without its newline (a crash in the middle of
an append) is cut off with a warning, so readers never see a torn line and appends always
start on a fresh line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from qcloop.monitor.core import atomic

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class LedgerError(ValueError):
    """A state file of the monitor that cannot be trusted (names the file, line and problem)."""


class JsonlLog:
    """An append-only file of JSON objects, one per line, safe across crashes.

    Args:
        path: the file (created on first append).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._repair()

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning(
            "%s: cutting off a torn last line of %d bytes (an append interrupted by a crash)",
            self.path,
            len(data) - keep,
        )
        with open(self.path, "r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every object in file order; ``LedgerError`` for a line that is not a JSON object."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise LedgerError(f"{self.path}: line {number} is not JSON ({exc})") from None
                if not isinstance(obj, dict):
                    raise LedgerError(f"{self.path}: line {number} is not a JSON object")
                out.append(obj)
        return out

    def append(self, obj: dict[str, Any]) -> None:
        """Append one object as one line and fsync (NaN and inf are refused)."""
        line = (json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)


def nifti_suffix(name: str) -> str | None:
    """``".nii.gz"`` or ``".nii"`` when ``name`` is a NIfTI file name, else ``None``."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def stem_of(name: str) -> str:
    """The file name without its NIfTI (or last) suffix."""
    suffix = nifti_suffix(name)
    if suffix:
        return name[: -len(suffix)]
    return Path(name).stem


def move_file(src: Path, dst: Path) -> Path:
    """Move ``src`` to ``dst`` (folders created): a rename, or across file systems an atomic
    copy then removal of ``src``. ``dst`` never exists half-written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with atomic.atomic_path(dst, suffix=nifti_suffix(dst.name) or "") as tmp:
            shutil.copyfile(src, tmp)
        src.unlink()
    return dst


def free_name(folder: Path, name: str, tag: str) -> Path:
    """``folder/name``, or ``folder/<stem>-<tag><suffix>`` when that is taken."""
    target = folder / name
    if not target.exists() and not Path(f"{target}.reason.txt").exists():
        return target
    suffix = nifti_suffix(name) or "".join(Path(name).suffixes[-1:])
    stem = name[: -len(suffix)] if suffix else name
    n = 0
    while True:
        candidate = folder / f"{stem}-{tag}{'-' + str(n) if n else ''}{suffix}"
        if not candidate.exists():
            return candidate
        n += 1


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link of ``src`` at ``dst`` (a copy where links are not possible)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
