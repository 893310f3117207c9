"""What a report is built from: a demo folder, an assess/predict output or a monitor folder,
read into one list of case rows (and, for a monitor, its ledger events).

A case row: ``id``, ``subject``, ``view``, ``phase``, ``vendor``, ``ood``, ``pdc`` and
``phd_mm`` (the decision structure's best values over candidates: what the fences judged),
``est_dice`` (the calibrated estimate of the selected output, where the run has one),
``true_dice`` (the served mask's, where ground truth exists: a monitor's from the corrected
masks of ``feedback`` events), ``fences`` (``pdc_low``,
``phd_high``), ``figure`` and ``mask`` (paths), ``seq`` and ``time`` (the monitor's order).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ReportError", "ReportSource", "read_source"]


class ReportError(ValueError):
    """A folder a report cannot be built from; the message says what is missing."""


@dataclass
class ReportSource:
    """The folder's kind (``demo``, ``assess``, ``monitor``), its case rows, and what else
    it holds (the demo's ablation tables, the monitor's ledger events, lines left out)."""

    folder: Path
    kind: str
    rows: list[dict[str, Any]]
    ablation: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _read_jsonl(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; unreadable lines (a torn last line) are noted."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                warnings.append(f"{path.name}:{n}: not a JSON line (left out)")
                continue
            if isinstance(obj, dict):
                out.append(obj)
            else:
                warnings.append(f"{path.name}:{n}: not a JSON object (left out)")
    return out


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _record_row(rec: dict[str, Any]) -> dict[str, Any]:
    """A case row from a QC record (assess, predict, monitor)."""
    structure = rec.get("decision_structure", "RV")
    pdcs, phds = [], []
    for c in rec.get("candidates") or []:
        s = c.get(structure) or {}
        pdcs.append(_finite(s.get("pdc")))
        phds.append(_finite(s.get("phd_mm")))
    pdcs = [v for v in pdcs if v is not None]
    phds = [v for v in phds if v is not None]
    true = (rec.get("true_selected") or {}).get(structure) or {}
    est = ((rec.get("estimate") or {}).get("structures") or {}).get(structure) or {}
    subject, view, phase = (str(rec.get(k, "")) for k in ("subject", "view", "phase"))
    return {
        "id": str(rec.get("case_id") or f"{subject}_{view}_{phase}"),
        "subject": subject,
        "view": view,
        "phase": phase,
        "vendor": str(rec.get("vendor") or "unknown"),
        "ood": rec.get("ood"),
        "pdc": max(pdcs) if pdcs else None,
        "phd_mm": min(phds) if phds else None,
        "est_dice": _finite(est.get("dice")),
        "true_dice": _finite(true.get("dice")),
        "fences": rec.get("fences"),
        "figure": rec.get("figure"),
        "mask": rec.get("mask"),
        "seq": rec.get("seq"),
        "time": rec.get("scored_at"),
    }


def _evaluation_row(ev: dict[str, Any]) -> dict[str, Any]:
    """A case row from a demo evaluation (the best candidate M with QC)."""
    subject, view, phase = (str(ev.get(k, "")) for k in ("subject", "view", "phase"))
    pseudo = (ev.get("pseudo_M") or {}).get("RV") or {}
    true = (ev.get("true_selected") or ev.get("true_M") or {}).get("RV") or {}
    return {
        "id": f"{subject}_{view}_{phase}",
        "subject": subject,
        "view": view,
        "phase": phase,
        "vendor": str(ev.get("vendor") or "unknown"),
        "ood": ev.get("ood"),
        "pdc": _finite(pseudo.get("pdc")),
        "phd_mm": _finite(pseudo.get("phd")),
        "true_dice": _finite(true.get("dice")),
        "fences": None,
        "figure": None,
        "mask": None,
        "seq": None,
        "time": None,
    }


def _ledger_events(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ledger's events other than cases, each with ``after_seq``: the last case scored
    before it (the ledger is in the order things happened)."""
    events, last = [], 0
    for e in entries:
        if e.get("event") == "case":
            last = e.get("seq", last)
        else:
            events.append({**e, "after_seq": last})
    return events


def _realised(rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    """Give each case a correction came for (a ``feedback`` event, the latest) its realised
    Dice: estimated and realised side by side in the report."""
    realised = {}
    for e in events:
        if e.get("event") == "feedback":
            rv = (e.get("scores") or {}).get("RV") or {}
            realised[e.get("case_id")] = _finite(rv.get("dice"))
    for r in rows:
        if r["id"] in realised:
            r["true_dice"] = realised[r["id"]]


def _need(folder: Path, *names: str) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ReportError(f"{folder}: {', '.join(missing)} missing (an unfinished run?)")


def read_source(folder: str | Path) -> ReportSource:
    """Read a demo folder, an assess/predict output or a monitor folder; ``ReportError``
    saying what is missing otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder}: not a folder")
    warnings: list[str] = []
    if (folder / "ablation.json").is_file() or (folder / "evaluations.jsonl").is_file():
        _need(folder, "ablation.json", "evaluations.jsonl")
        ablation = json.loads((folder / "ablation.json").read_text())
        evals = _read_jsonl(folder / "evaluations.jsonl", warnings)
        rows = [_evaluation_row(e) for e in evals if e.get("config", "M/M+QC") == "M/M+QC"]
        source = ReportSource(folder, "demo", rows, ablation=ablation, warnings=warnings)
    elif (folder / "ledger.jsonl").is_file():
        _need(folder, "records.jsonl")
        rows = [_record_row(r) for r in _read_jsonl(folder / "records.jsonl", warnings)]
        events = _ledger_events(_read_jsonl(folder / "ledger.jsonl", warnings))
        _realised(rows, events)
        source = ReportSource(folder, "monitor", rows, events=events, warnings=warnings)
    elif (folder / "records.jsonl").is_file() or (folder / "summary.json").is_file():
        _need(folder, "records.jsonl", "summary.json")
        rows = [_record_row(r) for r in _read_jsonl(folder / "records.jsonl", warnings)]
        source = ReportSource(folder, "assess", rows, warnings=warnings)
    else:
        raise ReportError(
            f"{folder}: not a qcloop output: expected ablation.json and evaluations.jsonl (a "
            "demo), ledger.jsonl and records.jsonl (a monitor), or records.jsonl and "
            "summary.json (assess, predict)"
        )
    if not source.rows:
        raise ReportError(f"{folder}: no case has been scored yet (no records)")
    return source
