"""The monitor's inbox: which files are ready to take, and what a file is (view, phase and
metadata) before it is loaded.

A case is taken once its size and modification time have not changed for ``settle_s`` seconds
(or when it was renamed in: writers should write ``.name.part`` or any hidden name, then
rename). Hidden files and ``*.json`` sidecars are not cases. A case's identity comes from its
sidecar JSON (``<stem>.json``), else from its name (``*_SA*``/``*_LA*``, ``*_ED*``/``*_ES*``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qcloop.monitor.data import CaseError
from qcloop.monitor.ops.files import nifti_suffix, stem_of

__all__ = ["VIEWS", "InboxCase", "InboxWatcher", "read_identity", "sidecar_of"]

VIEWS = ("SA", "LA")
_VIEW_RX = re.compile(r"(?:^|[_.-])(SA|LA)(?=[_.-]|$)", re.IGNORECASE)
_NOT_NIFTI = "not a NIfTI file (.nii or .nii.gz)"
_PHASE_RX = re.compile(r"(?:^|[_.-])(ED|ES)(?=[_.-]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class InboxCase:
    """One input file and what is known about it before loading."""

    path: Path
    sidecar: Path | None
    view: str
    phase: str
    metadata: dict[str, str]


def sidecar_of(path: Path) -> Path | None:
    """The sidecar JSON beside an input (``<stem>.json``), when there is one."""
    sidecar = path.with_name(f"{stem_of(path.name)}.json")
    return sidecar if sidecar.is_file() else None


def _read_sidecar(sidecar: Path) -> dict[str, str]:
    """A sidecar's fields as stripped strings; ``CaseError`` naming the file and the field."""
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CaseError(sidecar, f"sidecar is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CaseError(sidecar, "sidecar must be a JSON object")
    meta: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise CaseError(sidecar, f"field {key!r} must be a string or number")
        meta[str(key)] = str(value).strip()
    return meta


def read_identity(path: Path) -> InboxCase:
    """View, phase and metadata of an inbox file from its sidecar JSON (``<stem>.json``) or its
    name (``*_SA*``/``*_LA*``, ``*_ED*``/``*_ES*``); ``CaseError`` when the view is unknown."""
    stem = stem_of(path.name)
    sidecar = sidecar_of(path)
    meta = _read_sidecar(sidecar) if sidecar is not None else {}
    view = meta.get("view", "").upper()
    if not view:
        m = _VIEW_RX.search(stem)
        view = m.group(1).upper() if m else ""
    if view not in VIEWS:
        where = f"sidecar field 'view' is {meta['view']!r}" if "view" in meta else "no view"
        raise CaseError(
            path,
            f"cannot tell the view ({where}): name the file *_SA* or *_LA*, or add a sidecar "
            f'{stem}.json with "view": "SA" or "LA"',
        )
    phase = meta.get("phase", "").upper()
    if not phase:
        m = _PHASE_RX.search(stem)
        phase = m.group(1).upper() if m else "unknown"
    metadata = {k: v for k, v in meta.items() if k not in ("view", "phase")}
    return InboxCase(path, sidecar, view, phase, metadata)


class InboxWatcher:
    """Which inbox files are ready: unchanged (size, mtime) for ``settle_s`` seconds.

    Args:
        inbox: the folder watched (not recursive).
        settle_s: how long a file must stay unchanged before it is taken.
        clock: monotonic clock (injectable for tests).
    """

    def __init__(
        self, inbox: Path, settle_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inbox = Path(inbox)
        self.settle_s = float(settle_s)
        self._clock = clock
        self._seen: dict[Path, tuple[int, int, float]] = {}

    def scan(self) -> tuple[list[Path], list[tuple[Path, str]]]:
        """(ready NIfTI files oldest first, ready files to refuse with the reason: neither
        NIfTI nor JSON, or unreadable entries such as a symlink loop)."""
        now = self._clock()
        present = {}
        broken: list[tuple[Path, str]] = []
        try:
            entries = list(self.inbox.iterdir())
        except FileNotFoundError:
            return [], []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.lower().endswith(".json"):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            except OSError as exc:  # a symlink loop, a permission refused...
                broken.append((entry, f"cannot read it ({exc.strerror or exc})"))
                continue
            if not entry.is_file():  # folders, pipes, sockets are not cases
                continue
            key = (st.st_size, st.st_mtime_ns)
            prev = self._seen.get(entry)
            since = prev[2] if prev is not None and prev[:2] == key else now
            present[entry] = (key[0], key[1], since)
        self._seen = present
        ready = [p for p, (_s, _m, since) in present.items() if now - since >= self.settle_s]
        ready.sort(key=lambda p: (present[p][1], p.name))
        cases = [p for p in ready if nifti_suffix(p.name)]
        others = [(p, _NOT_NIFTI) for p in ready if not nifti_suffix(p.name)]
        return cases, broken + others

    def forget(self, path: Path) -> None:
        """Drop a file that was taken."""
        self._seen.pop(path, None)
