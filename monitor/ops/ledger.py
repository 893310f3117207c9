"""The durable state of ``qcloop monitor``: ``OUT/records.jsonl`` (one QC record per scored case)
and ``OUT/ledger.jsonl`` (processed cases by content hash, rejections, window resets, alerts,
refinements), both append-only JSONL, and what a restart reads back from them.

Each line of a :class:`JsonlLog` is written with one ``write`` of a whole line followed by
``fsync``. Opening a log repairs it: a last line without its newline (a crash in the middle of
an append) is cut off with a warning, so readers never see a torn line and appends always
start on a fresh line. A record is appended before its ledger entry, so a crash between the two
leaves a record without an entry; :class:`Ledger` adds the entry when it opens.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcloop.monitor.ops.drift import decision_est, decision_pdc

log = logging.getLogger(__name__)

__all__ = [
    "JsonlLog",
    "Ledger",
    "LedgerError",
    "ViewHistory",
    "WindowCase",
    "case_entry",
    "utc_now",
]

#: Ledger events that end the refinement an alert queued.
REFINEMENT_EVENTS = ("refinement", "refinement_failed", "refinement_skipped")


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (the time stamp of records and events)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


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
        """Cut off a torn last line; reads only the file's tail (a long log is not read)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:  # a reader of a read-only log never needs more
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return
            keep = _last_line_end(fh, size)
        log.warning(
            "%s: cutting off a torn last line of %d bytes (an append interrupted by a crash)",
            self.path,
            size - keep,
        )
        with open(self.path, "r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())

    def read_backwards(self) -> Iterator[dict[str, Any]]:
        """The objects from the last to the first, reading the file's tail first: a caller that
        needs only the newest lines stops early and never reads the rest."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            rest = b""
            for _, block in _blocks_backwards(fh, size):
                lines = (block + rest).split(b"\n")
                rest = lines[0]
                for line in reversed(lines[1:]):
                    if line.strip():
                        yield self._parse(line, None)
            if rest.strip():
                yield self._parse(rest, 1)

    def _parse(self, line: bytes | str, number: int | None) -> dict[str, Any]:
        where = f"line {number}" if number is not None else "a line"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise LedgerError(f"{self.path}: {where} is not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise LedgerError(f"{self.path}: {where} is not a JSON object")
        return obj

    def read(self) -> list[dict[str, Any]]:
        """Every object in file order; ``LedgerError`` for a line that is not a JSON object."""
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as fh:
            return [self._parse(line, n) for n, line in enumerate(fh, 1) if line.strip()]

    def append(self, obj: dict[str, Any]) -> None:
        """Append one object as one line and fsync (NaN and inf are refused)."""
        line = (json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            start = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            except BaseException:
                # a write cut short (a full disk) leaves no torn line for the next append to
                # follow: the file goes back to its last whole line
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
            finally:
                os.close(fd)


_BLOCK = 1 << 16


def _blocks_backwards(fh: Any, size: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, bytes)`` blocks of an open binary file from its end to its start."""
    end = size
    while end > 0:
        start = max(0, end - _BLOCK)
        fh.seek(start)
        yield start, fh.read(end - start)
        end = start


def _last_line_end(fh: Any, size: int) -> int:
    """The offset just after the file's last newline (0 when it has none)."""
    for start, block in _blocks_backwards(fh, size):
        at = block.rfind(b"\n")
        if at >= 0:
            return start + at + 1
    return 0


@dataclass(frozen=True)
class WindowCase:
    """One scored case as a view's rolling window holds it (from its ledger ``case`` entry)."""

    seq: int
    case_id: str
    phase: str
    vendor: str
    processed: str
    ood: bool
    pdc: float
    #: its decision est_dice (``None``: no estimator, or a ledger written before estimates)
    est: float | None = None

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> WindowCase:
        """From a ledger ``case`` entry."""
        return cls(
            int(entry["seq"]),
            str(entry["case_id"]),
            str(entry.get("phase", "unknown")),
            str(entry.get("vendor", "")),
            str(entry["processed"]),
            bool(entry["ood"]),
            float(entry["decision_pdc"]),
            None if entry.get("decision_est") is None else float(entry["decision_est"]),
        )


def case_entry(record: dict[str, Any]) -> dict[str, Any]:
    """The ledger ``case`` entry of a scored case's record."""
    return {
        "event": "case",
        "sha256": record["sha256"],
        "seq": int(record["seq"]),
        "case_id": record["case_id"],
        "view": record["view"],
        "phase": record.get("phase", "unknown"),
        "vendor": record.get("vendor", ""),
        "source_file": record["source_file"],
        "processed": record["processed"],
        "mask": record["mask"],
        "ood": bool(record.get("ood")),
        "decision_pdc": decision_pdc(record),
        "decision_est": decision_est(record),
        "model_version": str((record.get("model") or {}).get("version", "")),
        "time": record.get("scored_at", utc_now()),
    }


@dataclass
class ViewHistory:
    """What a restart recovers for one view from the ledger: the cases of its current window
    (since the last reset, scored by the current model), its last alert, and whether the
    refinement that alert queued has finished."""

    cases: list[WindowCase] = field(default_factory=list)
    last_alert: dict[str, Any] | None = None
    alert_finished: bool = False

    @property
    def last_alert_time(self) -> float | None:
        """Unix time of the last alert (``None``: none)."""
        return None if self.last_alert is None else float(self.last_alert.get("unix_time", 0.0))

    @property
    def cases_since_alert(self) -> int:
        """Cases of the current window scored after the last alert."""
        if self.last_alert is None:
            return 0
        return sum(1 for c in self.cases if c.seq > self.last_alert.get("seq", 0))

    def unfinished_alert(self, view: str) -> dict[str, Any] | None:
        """The alert whose refinement was queued but never finished (a crash), else ``None``."""
        alert = self.last_alert
        if alert is None or not alert.get("refine") or self.alert_finished:
            return None
        return alert.get("alert") or {"view": view}


class Ledger:
    """The monitor's records and ledger in ``out``, read back (and repaired) on opening.

    Attributes:
        done: ledger ``case`` entries by the input's content hash.
        rejected: ledger ``rejected`` events by the input's content hash, where known.
        seq: the sequence number of the last scored case.
    """

    def __init__(self, out: Path) -> None:
        self.records = JsonlLog(Path(out) / "records.jsonl")
        self.events = JsonlLog(Path(out) / "ledger.jsonl")
        self.done: dict[str, dict[str, Any]] = {}
        #: the same ``case`` entries by case id (late ground truth names cases so)
        self.by_case_id: dict[str, dict[str, Any]] = {}
        #: ``rejected`` events by the input's content hash (to finish an interrupted move)
        self.rejected: dict[str, dict[str, Any]] = {}
        #: the last ``refinement`` event of each window id (a window is refined once)
        self.refined_windows: dict[str, dict[str, Any]] = {}
        self.seq = 0
        self._opened = self._recover()

    def _recover(self) -> list[dict[str, Any]]:
        """Read the ledger; add entries for records a crash left without one."""
        entries = self.events.read()
        for e in entries:
            if e.get("event") == "case":
                self._remember(e)
            else:
                self._index(e)
        for rec in self._records_without_entry():
            entry = case_entry(rec)
            log.warning("%s: record without ledger entry (crash); recovered", rec["case_id"])
            self.events.append(entry)
            entries.append(entry)
            self._remember(entry)
        return entries

    def _records_without_entry(self) -> list[dict[str, Any]]:
        """The newest records with no ledger entry, oldest first. A record is appended before
        its entry, so only the last few can lack one: the records file is read backwards up to
        the newest record the ledger knows (a restart does not read months of records)."""
        missing: list[dict[str, Any]] = []
        for rec in self.records.read_backwards():
            sha = rec.get("sha256")
            if not sha:
                continue
            if sha in self.done:
                break
            missing.append(rec)
        return missing[::-1]

    def _remember(self, entry: dict[str, Any]) -> None:
        self.done[entry["sha256"]] = entry
        self.by_case_id[entry["case_id"]] = entry
        self.seq = max(self.seq, int(entry["seq"]))

    def known(self, sha: str) -> dict[str, Any] | None:
        """The ledger entry of an input with this content hash, if it was scored."""
        return self.done.get(sha)

    def add_case(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append a scored case's record, then its ledger entry; returns the entry."""
        from qcloop.monitor.core.crash_points import crash_point

        self.records.append(record)
        crash_point("intake.after_record")
        entry = case_entry(record)
        self.events.append(entry)
        self._remember(entry)
        return entry

    def append(self, event: dict[str, Any]) -> None:
        """Append one ledger event (``rejected``, ``alert``, ``window_reset``, ...)."""
        self.events.append(event)
        self._index(event)

    def _index(self, event: dict[str, Any]) -> None:
        """Keep what later decisions look events up by: rejections by content hash, finished
        refinements by window id."""
        kind = event.get("event")
        if kind == "rejected" and event.get("sha256"):
            self.rejected[event["sha256"]] = event
        elif kind == "refinement" and event.get("window_id"):
            self.refined_windows[event["window_id"]] = event

    def history(self, view: str, model_version: str) -> ViewHistory:
        """What the ledger held for ``view`` when it was opened, for a model of
        ``model_version`` (a model promoted while the monitor was stopped starts a new
        window)."""
        history = ViewHistory()
        for e in self._opened:
            if e.get("view") != view:
                continue
            kind = e.get("event")
            if kind == "case":
                if str(e.get("model_version")) != model_version:
                    history.cases.clear()
                    continue
                history.cases.append(WindowCase.from_entry(e))
            elif kind == "window_reset":
                history.cases.clear()
            elif kind == "alert":
                history.last_alert, history.alert_finished = e, False
            elif kind in REFINEMENT_EVENTS and history.last_alert is not None:
                history.alert_finished = True
        return history
