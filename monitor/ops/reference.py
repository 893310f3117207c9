"""The reference median decision pDC of a served model: what the drift policy compares a view's
window median with.

It comes from the model's run folder: the median over the calibration cases that training
recorded in ``fences.json`` (``reference.median_pdc``); for runs trained before that was
recorded, the median over the run's validation cases (split as at training time, from the data
folder ``run.json`` names), scored once with the serving scorer. Either way it is cached in
``OUT/reference.json`` by view, model name, version and run folder, with its source. With
neither (an old run moved to a machine without its training data) there is no reference and
the median rule of the drift policy is off.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from qcloop.monitor.core import atomic
from qcloop.monitor.core.interfaces import ModelRef
from qcloop.monitor.data import CaseError
from qcloop.monitor.ops.drift import FlagReference, decision_pdc

log = logging.getLogger(__name__)

__all__ = [
    "REFERENCE_FILE",
    "cached_reference",
    "cached_reference_median",
    "compute_reference",
    "flag_reference",
]

REFERENCE_FILE = "reference.json"


def cached_reference_median(out: Path, model: ModelRef, scorer: Any) -> float | None:
    """The reference median of ``model``'s view (see :func:`cached_reference`)."""
    entry = cached_reference(out, model, scorer)
    return None if entry is None else float(entry["median_pdc"])


def flag_reference(entry: dict[str, Any] | None) -> FlagReference | None:
    """The in-distribution flag rate of a reference entry (``None`` when it has none)."""
    if entry is None or not entry.get("loo_cases"):
        return None
    return FlagReference(int(entry["loo_flagged"]), int(entry["loo_cases"]))


def cached_reference(out: Path, model: ModelRef, scorer: Any) -> dict[str, Any] | None:
    """The reference of ``model``'s view (median decision pDC and, where known, the
    leave-one-out flag count), from ``out/reference.json`` or computed (then cached);
    ``None`` when the run has none (logged)."""
    cache_path = Path(out) / REFERENCE_FILE
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    key = f"{model.view}|{model.name}|{model.version}|{Path(model.run_dir).resolve()}"
    if key in cache and "loo_cases" in cache[key]:
        return dict(cache[key])
    entry = compute_reference(model.run_dir, model.view, scorer)
    if entry is None:
        log.warning("%s: no reference median; the median-shift rule is off", model.view)
        return None
    if flag_reference(entry) is None:
        log.warning(
            "%s: no reference flag rate (a run from before it was recorded, without its "
            "data); the drift rule falls back to monitoring.ood_fraction_limit",
            model.view,
        )
    cache[key] = entry
    atomic.write_json(cache_path, cache)
    log.info(
        "%s: reference median decision pDC %.4f (%s, %d cases)",
        model.view,
        entry["median_pdc"],
        entry["source"],
        entry["cases"],
    )
    return entry


def compute_reference(run_dir: str | Path, view: str, scorer: Any) -> dict[str, Any] | None:
    """``{"median_pdc", "cases", "source", "run"}`` of a run's view: from its fences' recorded
    calibration median, else over its validation cases scored with ``scorer``; ``None`` when
    neither is available."""
    from qcloop.monitor.method.run_folder import load_view_fences

    run = Path(run_dir)
    fences = load_view_fences(run, view)
    if fences is not None and fences.reference_median is not None:
        recorded = fences.reference or {}
        entry = {
            "median_pdc": fences.reference_median,
            "cases": int(recorded.get("cases", 0)),
            "source": f"calibration cases recorded in {view}/fences.json",
            "run": str(run.resolve()),
        }
        if "loo_cases" in recorded:
            entry.update({k: int(recorded[k]) for k in ("loo_flagged", "loo_cases")})
        else:
            entry.update(_validation_flags(run, view))
        return entry
    entry = _validation_median(run, view, scorer)
    if entry is not None:
        entry.update(_validation_flags(run, view))
    return entry


def _validation_flags(run: Path, view: str) -> dict[str, int]:
    """The leave-one-out flag count of the run's validation cases, for runs that recorded
    none (``{}`` without their data)."""
    from qcloop.monitor.method.reference_rate import reference_flags_of_run

    try:
        return reference_flags_of_run(run, view) or {}
    except (CaseError, ValueError, OSError) as exc:
        log.warning("%s: reference flag rate unavailable (%s)", view, exc)
        return {}


def _validation_median(run: Path, view: str, scorer: Any) -> dict[str, Any] | None:
    """The median decision pDC of the run's validation cases scored with ``scorer`` (runs
    trained before the calibration median was recorded); ``None`` without their data."""
    from qcloop.monitor.data import load_case
    from qcloop.monitor.method.cases import sources_for, split_labelled
    from qcloop.monitor.method.run_folder import load_run_config, read_run_info

    data = read_run_info(run).get("data")
    if not data or not Path(data).is_dir():
        return None
    cfg = load_run_config(run)
    try:
        _, val = split_labelled(sources_for(data, [view]), seed=cfg.seed)
    except CaseError as exc:
        log.warning("%s: validation cases unavailable (%s)", view, exc)
        return None
    values = []
    for src in val:
        try:
            values.append(decision_pdc(scorer.score(load_case(src)).record))
        except CaseError as exc:
            log.warning("reference: %s skipped (%s)", src.image_path, exc)
    if not values:
        return None
    return {
        "median_pdc": float(statistics.median(values)),
        "cases": len(values),
        "source": f"validation cases of {data}",
        "run": str(run.resolve()),
    }
