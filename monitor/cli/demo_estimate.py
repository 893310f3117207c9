"""The demo's quality-estimate stage: the calibrated estimate fitted on the trained run, and
measured against true Dice beside pDC (``ablation.json``'s ``qc_estimates``, a section of
``ablation.md``, ``calibration.png``).

The calibrator is fitted on vendor A's validation subjects and the severity ladder's odd
severities (1, 3, 5); it is measured on the test subjects of vendors A, B and C (which it never
saw) and on the ladder's even severities (2, 4: held out, but the same kinds of shift it was
fitted on). The stage runs after the ablation, so it changes none of its figures.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from qcloop.monitor.core import atomic
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.interfaces import Tracker

log = logging.getLogger(__name__)

#: Where the demo's calibrator is fitted (validation subjects have no ladder severity).
CALIBRATION_CASES = {"SPLIT": ["val", "ladder"], "SHIFT_SEVERITY": ["", "1", "3", "5"]}
#: Where it is measured, and the cohort name of each.
EVALUATION_CASES = (
    ("test", {"SPLIT": "test"}),
    ("ladder", {"SPLIT": "ladder", "SHIFT_SEVERITY": ["2", "4"]}),
)
#: The demo fits the linear calibrator: on the default demo it beat the isotonic default on
#: every vendor's RV (docs/demo.md, "Quality estimates"); ``qcloop fit-estimator`` keeps
#: isotonic as its default because it needs pDC alone (masks scored without probabilities).
CALIBRATOR = "linear"


def _records(data: Path, run: Path, where: dict[str, Any], tmp: Path, tracker: Tracker) -> list:
    from qcloop.monitor.method.assess import assess_run

    out = Path(tempfile.mkdtemp(dir=tmp))
    assess_run(data, run, out, where=where, tracker=tracker)
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def estimate_stage(
    out: Path, data: Path, run: Path, cfg: QcloopConfig, tracker: Tracker
) -> dict[str, Any]:
    """Fit ``run``'s estimator, measure it; the ``qc_estimates`` part of ``ablation.json``."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager
    from qcloop.monitor.method.qc_evaluation import qc_rows
    from qcloop.monitor.method.quality_estimate import fit_estimator, save_estimator

    calibrators = get_plugin_manager().calibrators()
    warnings: list[str] = []
    measured: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qcloop-demo-est-") as tmp:
        fit_on = _records(data, run, CALIBRATION_CASES, Path(tmp), tracker)
        for view in cfg.views:
            mine = [r for r in fit_on if r["view"] == view]
            fitted_on = {"data": str(data), "where": CALIBRATION_CASES, "cases": len(mine)}
            est = fit_estimator(mine, calibrators, CALIBRATOR, fitted_on=fitted_on)
            save_estimator(run / view, est)
            warnings += [f"{view} {w}" for w in est.warnings]
        for cohort, where in EVALUATION_CASES:
            for rec in _records(data, run, where, Path(tmp), tracker):
                rec["cohort"] = rec["vendor"] if cohort == "test" else cohort
                measured.append(rec)
    _plot(out, measured)
    return {
        "calibrator": CALIBRATOR,
        "fitted_on": CALIBRATION_CASES,
        "cases_fitted": len(fit_on),
        "warnings": warnings,
        "rows": qc_rows(measured, group="cohort"),
    }


def _plot(out: Path, records: list[dict[str, Any]]) -> None:
    """``out/calibration.png`` where matplotlib is installed (the ``report`` extra)."""
    from qcloop.monitor.core.optional import MissingExtraError
    from qcloop.monitor.report.calibration_plot import calibration_png

    try:
        atomic.write_bytes(out / "calibration.png", calibration_png(records))
    except MissingExtraError as exc:
        log.warning("no calibration plot: %s", exc)


def estimates_markdown(section: dict[str, Any]) -> str:
    """The ``ablation.md`` section of the quality estimates."""
    from qcloop.monitor.method.qc_evaluation import qc_markdown

    lines = [
        "",
        "## Quality estimates: calibrated est_dice and pDC against true Dice",
        "",
        f"`{section['calibrator']}` calibrator fitted on {section['cases_fitted']} cases "
        "(vendor A validation subjects and the severity ladder at severities 1, 3, 5); "
        "measured on the test subjects of vendors A, B, C and on the ladder's held-out "
        "severities 2 and 4 (`ladder`). Failure: true Dice < 0.8; interval: 90 %. "
        "Plot: `calibration.png`.",
        "",
    ]
    lines += [f"- warning: {w}" for w in section["warnings"]]
    return "\n".join(lines) + "\n" + qc_markdown(section["rows"], "cohort")
