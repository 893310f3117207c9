"""Late ground truth: corrected masks for cases the monitor scored, turned into measured
accuracy.

A corrected mask names its case by the monitor's case id (``<case_id>.nii.gz``, optionally
``_gt``, ``_corrected`` or ``_mask`` before the extension), by the full content hash of the
input that was scored (``<sha256>.nii.gz``), or by a sidecar JSON (``{"case_id": ...}`` or
``{"sha256": ...}``). It must lie on the grid of the mask that was served (shape and affine)
and hold labels 0..3 only. Each accepted correction:

* appends a ``feedback`` ledger event: the realised Dice/HD (mm) per structure of the served
  mask against the correction, beside the pDC/pHD QC estimated for it, the error (realised
  Dice minus pDC), whether the case was flagged and whether it failed (decision structure's
  realised Dice below 0.8);
* is stored with its image as labelled data under ``OUT/labelled/<VIEW>/`` (M&Ms-2 layout,
  ``_gt`` masks, ``dataset_information.csv``), for ``qcloop refine --labelled``;
* is broadcast as ``FeedbackReceived`` (an exporter turns it into ``qcloop_pdc_error`` and
  the flag confusion counts).

A correction that cannot be used is refused with its reason and changes nothing stored.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor.core import atomic
from qcloop.monitor.core.events import FeedbackReceived
from qcloop.monitor.method.evaluation import FAILURE_DICE
from qcloop.monitor.ops.files import link_or_copy, nifti_suffix, stem_of
from qcloop.monitor.ops.ledger import Ledger, utc_now
from qcloop.monitor.report.case_figure import served_scores

__all__ = ["FeedbackOutcome", "file_correction", "take_corrections", "take_feedback"]

log = logging.getLogger(__name__)

_SUFFIXES = ("_gt", "_corrected", "_mask")
_STRUCTURES = ("LV", "MYO", "RV")


@dataclass
class FeedbackOutcome:
    """What became of one corrected mask: ``stored`` with its ledger event, or ``refused``
    with the reason."""

    path: Path
    outcome: str
    reason: str = ""
    event: dict[str, Any] | None = None


def _candidates(path: Path) -> list[str]:
    """The names a corrected mask may go by: its stem without a known suffix, and its
    sidecar's ``case_id`` / ``sha256``."""
    stem = stem_of(path.name)
    names = [stem]
    names += [stem[: -len(s)] for s in _SUFFIXES if stem.endswith(s)]
    sidecar = path.with_name(f"{stem}.json")
    if sidecar.is_file():
        try:
            side = json.loads(sidecar.read_text())
        except ValueError:
            side = {}
        if isinstance(side, dict):
            names += [str(side[k]) for k in ("case_id", "sha256") if k in side]
    return names


def _match(path: Path, ledger: Ledger) -> dict[str, Any] | None:
    for name in _candidates(path):
        entry = ledger.by_case_id.get(name) or ledger.done.get(name)
        if entry is not None:
            return entry
    return None


def _load(path: Path, served: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """The corrected and served label maps and the voxel size; ``ValueError`` naming the
    problem (not NIfTI, another grid, labels outside 0..3)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        corrected = np.asarray(img.dataobj)
    except Exception as exc:
        raise ValueError(f"not a readable NIfTI mask ({exc})") from None
    ref = nib.load(str(served))
    if corrected.shape != ref.shape:
        raise ValueError(f"grid {corrected.shape} differs from the served mask's {ref.shape}")
    if not np.allclose(img.affine, ref.affine, atol=1e-3):
        raise ValueError("affine differs from the served mask's (another orientation or spacing)")
    if not np.all(np.isfinite(corrected)) or not np.array_equal(corrected, np.round(corrected)):
        raise ValueError("labels must be whole numbers 0..3")
    values = {int(v) for v in np.unique(corrected)}
    if not values <= {0, 1, 2, 3}:
        raise ValueError(f"labels outside 0..3: {sorted(values - {0, 1, 2, 3})}")
    spacing = tuple(float(z) for z in ref.header.get_zooms()[:3])
    return corrected.astype(np.uint8), np.asarray(ref.dataobj).astype(np.uint8), spacing


def _record(out: Path, case_id: str) -> dict[str, Any]:
    with open(out / "records.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if f'"{case_id}"' in line:
                rec = json.loads(line)
                if rec.get("case_id") == case_id:
                    return rec
    raise ValueError(f"no record of case {case_id} in records.jsonl")


def _store_labelled(out: Path, entry: dict[str, Any], corrected: Path) -> Path:
    """The case's image and its correction under ``OUT/labelled/<VIEW>/`` (M&Ms-2 layout)."""
    view, seq = entry["view"], int(entry["seq"])
    phase = entry["phase"] if entry["phase"] in ("ED", "ES") else "ED"
    folder = out / "labelled" / view / f"{seq:06d}"
    ext = nifti_suffix(str(entry["processed"])) or ".nii.gz"
    link_or_copy(out / entry["processed"], folder / f"{seq:06d}_{view}_{phase}{ext}")
    gt = folder / f"{seq:06d}_{view}_{phase}_gt{nifti_suffix(corrected.name) or '.nii.gz'}"
    atomic.write_bytes(gt, corrected.read_bytes())
    csv_path = out / "labelled" / view / "dataset_information.csv"
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text()))) if csv_path.is_file() else []
    rows = [r for r in rows if r["SUBJECT_CODE"] != f"{seq:06d}"]
    rows.append({"SUBJECT_CODE": f"{seq:06d}", "DISEASE": "", "VENDOR": entry.get("vendor", ""),
                 "SCANNER": "", "FIELD": "", "SPLIT": "feedback", "CASE_ID": entry["case_id"]})  # fmt: skip
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(csv_path, buf.getvalue())
    return gt


def take_feedback(
    out: Path, ledger: Ledger, path: Path, pm: Any = None, service: str | None = None
) -> FeedbackOutcome:
    """Match, check, score and store one corrected mask (see the module docstring)."""
    from qcloop.monitor.method.segmentation_metrics import compute_metrics

    entry = _match(path, ledger)
    if entry is None:
        return FeedbackOutcome(path, "refused", "matches no scored case (by case id or hash)")
    try:
        corrected, served, spacing = _load(path, Path(entry["mask"]))
        record = _record(out, entry["case_id"])
    except (OSError, ValueError) as exc:
        return FeedbackOutcome(path, "refused", str(exc))
    realised = compute_metrics(served, corrected, spacing)
    calibrated = ((record.get("estimate") or {}).get("structures")) or {}
    estimated = {
        s: {"pdc": v["pdc"], "phd_mm": v["phd_mm"]}
        | ({"est_dice": calibrated[s]["dice"]} if s in calibrated else {})
        for s, v in served_scores(record).items()
        if s in _STRUCTURES
    }
    scores = {
        s: {"dice": float(v.dice), "hd_mm": float(v.hd), **estimated.get(s, {})}
        for s, v in realised.items()
    }
    structure = record.get("decision_structure", "RV")
    failed = bool(scores.get(structure, {}).get("dice", 1.0) < FAILURE_DICE)
    gt = _store_labelled(out, entry, path)
    event = {
        "event": "feedback", "case_id": entry["case_id"], "sha256": entry["sha256"],
        "view": entry["view"], "phase": entry["phase"], "flagged": bool(entry["ood"]),
        "failed": failed, "scores": scores,
        "error": {s: v["dice"] - v["pdc"] for s, v in scores.items() if "pdc" in v},
        "est_error": {s: v["dice"] - v["est_dice"] for s, v in scores.items() if "est_dice" in v},
        "corrected": str(gt), "time": utc_now(),
    }  # fmt: skip
    ledger.append(event)
    if pm is not None:
        pm.emit(FeedbackReceived(entry["view"], entry["case_id"], scores, event["flagged"],
                                 failed, service=service))  # fmt: skip
    return FeedbackOutcome(path, "stored", event=event)


def file_correction(outcome: FeedbackOutcome) -> None:
    """Move a correction taken from the monitor's ``corrected/`` folder (with its sidecar) to
    ``corrected/done/``, or to ``corrected/refused/`` beside ``<name>.reason.txt``."""
    from qcloop.monitor.ops.files import free_name, move_file

    path = outcome.path
    folder = path.parent / ("done" if outcome.outcome == "stored" else "refused")
    target = free_name(folder, path.name, utc_now().replace(":", ""))
    sidecar = path.with_name(f"{stem_of(path.name)}.json")
    if sidecar.is_file():
        move_file(sidecar, target.with_name(f"{stem_of(target.name)}.json"))
    if outcome.outcome != "stored":
        atomic.write_text(target.with_name(f"{target.name}.reason.txt"), outcome.reason + "\n")
    move_file(path, target)


def take_corrections(
    watcher: Any, out: Path, ledger: Ledger, pm: Any = None, service: str | None = None
) -> int:
    """Take the corrected masks ``watcher`` (over ``OUT/corrected/``) finds ready: each scored
    and filed (``done/`` or ``refused/``); returns how many were taken."""
    ready, _ = watcher.scan()
    for path in ready:
        watcher.forget(path)
        try:
            outcome = take_feedback(out, ledger, path, pm, service)
            file_correction(outcome)
        except OSError as exc:  # left in place: the next scan tries again
            log.error("%s: feedback not taken (%s)", path.name, exc)
            continue
        log.info(
            "%s: feedback %s%s",
            path.name,
            outcome.outcome,
            f" ({outcome.reason})" * bool(outcome.reason),
        )
    return len(ready)
