"""One inbox file taken by the monitor: scored and filed, finished (a move a crash interrupted),
moved aside as a duplicate, or rejected with its reason.

A scored case's work, in order: score, write the mask, append the record, append the ledger
entry, move the input to ``OUT/processed/<VIEW>/NNNNNN/`` (M&Ms-2 layout), broadcast
``CaseScored``. A rejected input goes to ``OUT/rejected/`` with ``<name>.reason.txt``, a
``rejected`` ledger event and a ``CaseFailed`` event naming the stage (``read``, ``score``).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcloop.monitor.core import atomic
from qcloop.monitor.core.atomic import sha256_file
from qcloop.monitor.core.crash_points import crash_point
from qcloop.monitor.core.events import CaseFailed, CaseScored
from qcloop.monitor.data import Case, CaseError, CaseSource
from qcloop.monitor.data.nifti_header import HeaderLimits, HeaderProblem, inspect_header
from qcloop.monitor.ops.files import free_name, move_file, nifti_suffix, stem_of
from qcloop.monitor.ops.inbox import InboxCase, read_identity, sidecar_of
from qcloop.monitor.ops.ledger import Ledger, utc_now
from qcloop.monitor.report.case_figure import wants_figure

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.plugin_manager import QcloopPluginManager
    from qcloop.monitor.ops.scoring import CaseResult, OnlineScorer

log = logging.getLogger(__name__)

__all__ = ["Intake", "Taken"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Taken:
    """What became of one inbox file: ``outcome`` (``scored``, ``rejected``, ``recovered``,
    ``duplicate``, ``vanished``) and, for a scored case, its ledger entry."""

    outcome: str
    entry: dict[str, Any] | None = None


class Intake:
    """Takes inbox files into the monitor's output folder.

    Args:
        out: the output folder.
        ledger: the monitor's records and ledger.
        pm: the plugin manager events go through.
        service: the monitor's service id (copied into the events).
    """

    def __init__(
        self,
        out: Path,
        ledger: Ledger,
        pm: QcloopPluginManager,
        service: str | None = None,
        limits: Callable[[str], HeaderLimits] | None = None,
        figures: str = "none",
    ) -> None:
        wants_figure(figures, None)  # ValueError for an unknown choice
        if figures != "none" and importlib.util.find_spec("matplotlib") is None:
            log.warning(
                "no case figures: matplotlib is not installed (pip install 'qcloop[report]')"
            )
            figures = "none"
        self.out = out
        self.figures = figures
        self.ledger = ledger
        self.service = service
        self._pm = pm
        self._limits = limits

    def take(self, path: Path, scorers: Mapping[str, OnlineScorer]) -> Taken:
        """Score ``path`` with the scorer of its view (the served views are ``scorers``'
        keys), or finish, set aside or reject it."""
        try:
            sha = sha256_file(path)
        except FileNotFoundError:
            return Taken("vanished")
        if self.ledger.known(sha) is not None:
            return Taken(self._finish_known(path, sha))
        unfinished = self.ledger.rejected.get(sha)
        if unfinished is not None and not Path(unfinished["rejected"]).exists():
            log.warning("%s: rejected before; finishing its move", shown_name(path))
            target, sidecar = Path(unfinished["rejected"]), sidecar_of(path)
            if sidecar is not None:
                move_file(sidecar, target.with_name(f"{stem_of(target.name)}.json"))
            move_file(path, target)
            return Taken("recovered")
        try:
            ident = read_identity(path)
        except CaseError as exc:
            return Taken(self.reject(path, sidecar_of(path), "read", exc.reason, sha=sha))
        if ident.view not in scorers:
            served = ", ".join(sorted(scorers))
            reason = f"a {ident.view} case; this monitor serves {served}"
            return Taken(self.reject(path, ident.sidecar, "read", reason, sha=sha))
        problem = self._header_problem(path, ident.view)
        if problem is not None:
            return Taken(self.reject(path, ident.sidecar, "read", problem, ident.view, sha=sha))
        from qcloop.monitor.data import load_case

        try:
            case = load_case(_source(ident))
        except CaseError as exc:
            return Taken(self.reject(path, ident.sidecar, "read", exc.reason, ident.view, sha=sha))
        try:
            result = scorers[ident.view].score(case)
        except CaseError as exc:
            return Taken(self.reject(path, ident.sidecar, "score", exc.reason, ident.view, sha=sha))
        except Exception as exc:  # a scoring failure must not stop the loop
            log.exception("%s: scoring failed", path)
            reason = f"scoring failed: {exc!r}"
            return Taken(self.reject(path, ident.sidecar, "score", reason, ident.view, sha=sha))
        figure = self._figure(ident, sha, scorers[ident.view], result)
        return Taken("scored", self._file_scored(ident, sha, case, result, figure))

    def _figure(
        self, ident: InboxCase, sha: str, scorer: OnlineScorer, result: CaseResult
    ) -> dict[str, str]:
        """Draw the case's QC figure where ``figures`` asks for one: ``{"figure": path}``, or
        ``{"figure_error": why}``; a full disk is raised (intake pauses), nothing else is."""
        if not wants_figure(self.figures, result.ood):
            return {}
        path = self.out / "figures" / f"{_case_id(ident.path, sha)}.png"
        try:
            atomic.write_bytes(path, scorer.figure_png(result))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            return {"figure_error": str(exc)}
        except Exception as exc:  # the case counts more than its picture
            log.warning("%s: no figure (%s)", shown_name(ident.path), exc)
            return {"figure_error": str(exc)}
        return {"figure": str(path)}

    def _header_problem(self, path: Path, view: str) -> str | None:
        """Why the file cannot be taken, judged from its first bytes against the limits of
        its view (those of ``qcloop serve``), before any voxel is decompressed; else None."""
        if self._limits is None:
            return None
        try:
            with open(path, "rb") as fh:
                inspect_header(fh, self._limits(view))
        except HeaderProblem as exc:
            return exc.reason
        except OSError as exc:
            return f"cannot read it ({exc.strerror or exc})"
        return None

    def _file_scored(
        self,
        ident: InboxCase,
        sha: str,
        case: Case,
        result: CaseResult,
        figure: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Write the mask, record and ledger entry of a scored case, move its input in and
        broadcast it; returns its ledger entry."""
        from qcloop.monitor.data import save_label_map

        path, view = ident.path, ident.view
        seq = self.ledger.seq + 1
        case_id = _case_id(path, sha)
        phase_file = ident.phase if ident.phase in ("ED", "ES") else "ED"
        ext = nifti_suffix(path.name) or ".nii.gz"
        processed = f"processed/{view}/{seq:06d}/{seq:06d}_{view}_{phase_file}{ext}"
        mask = self.out / "masks" / f"{case_id}_pred.nii.gz"
        save_label_map(mask, result.labels, case)
        record = dict(result.record)
        record.update(
            {
                "image": str(self.out / processed),
                "source_file": shown_name(path),
                "case_id": case_id,
                "seq": seq,
                "sha256": sha,
                "processed": processed,
                "mask": str(mask),
                "scored_at": utc_now(),
                **(figure or {}),
            }
        )
        entry = self.ledger.add_case(record)
        crash_point("intake.after_ledger")
        self._move_in(path, ident.sidecar, entry)
        self._pm.emit(CaseScored(record, service=self.service))
        log.info(
            "%s: %s %s scored (OoD %s, decision pDC %.3f)",
            case_id,
            view,
            ident.phase,
            entry["ood"],
            entry["decision_pdc"],
        )
        return entry

    def _move_in(self, path: Path, sidecar: Path | None, entry: dict[str, Any]) -> None:
        """Move a scored input and its sidecar in, the sidecar first: a crash in between
        leaves the image in the inbox, which the ledger knows (its move is finished on restart),
        and never a sidecar without its image (a later file of the same name would adopt it)."""
        target = self.out / entry["processed"]
        if sidecar is not None and sidecar.exists():
            move_file(sidecar, target.with_name(f"{stem_of(target.name)}.source.json"))
        crash_point("intake.between_moves")
        move_file(path, target)

    def _finish_known(self, path: Path, sha: str) -> str:
        """An input whose content the ledger knows: finish its move, or set it aside."""
        entry = self.ledger.done[sha]
        target = self.out / entry["processed"]
        sidecar = sidecar_of(path)
        if not target.exists():
            log.warning("%s: already scored as %s; finishing its move", path, entry["case_id"])
            self._move_in(path, sidecar, entry)
            return "recovered"
        dup = free_name(self.out / "duplicates", path.name, sha[:10])
        log.warning(
            "%s: same content as %s (scored before); moved to %s", path, entry["case_id"], dup
        )
        if sidecar is not None:
            move_file(sidecar, dup.with_name(f"{stem_of(dup.name)}.json"))
        move_file(path, dup)
        return "duplicate"

    def reject(
        self,
        path: Path,
        sidecar: Path | None,
        stage: str,
        reason: str,
        view: str | None = None,
        *,
        sha: str | None = None,
    ) -> str:
        """Move an input that cannot be scored to ``rejected/`` with its reason; returns
        ``"rejected"``. The ledger event comes first (with the content hash ``sha`` when
        known, so that a restart finishes an interrupted move), then the sidecar, then the
        input."""
        target = free_name(self.out / "rejected", path.name, utc_now().replace(":", ""))
        atomic.write_text(Path(f"{target}.reason.txt"), f"{shown_name(path)}: {reason}\n")
        event = {
            "event": "rejected",
            "source_file": shown_name(path),
            "stage": stage,
            "reason": reason,
            "rejected": str(target),
            "time": utc_now(),
        }
        self.ledger.append({**event, "sha256": sha} if sha else event)
        crash_point("reject.after_ledger")
        if sidecar is not None and sidecar.exists():
            move_file(sidecar, target.with_name(f"{stem_of(target.name)}.json"))
        crash_point("reject.between_moves")
        with contextlib.suppress(FileNotFoundError):
            move_file(path, target)
        self._pm.emit(CaseFailed(stage, reason, shown_name(path), view, service=self.service))
        log.warning("%s: rejected (%s): %s", shown_name(path), stage, reason)
        return "rejected"


def _case_id(path: Path, sha: str) -> str:
    """The case's id in the output folder: its file's stem (made safe) and its hash prefix."""
    return f"{_SAFE.sub('_', stem_of(path.name))[:80]}-{sha[:10]}"


def shown_name(path: Path) -> str:
    """A file's name as text that can be written anywhere: bytes that are not UTF-8 (kept by
    Python as surrogates) appear as ``\\xNN``."""
    return os.fsencode(path.name).decode("utf-8", "backslashreplace")


def _source(ident: InboxCase) -> CaseSource:
    """The case source of an identified inbox file."""
    return CaseSource(
        subject=ident.metadata.get("subject") or stem_of(ident.path.name),
        view=ident.view,
        phase=ident.phase,
        image_path=ident.path,
        gt_path=None,
        metadata={k: v for k, v in ident.metadata.items() if k != "subject"},
        layout="inbox",
    )
