"""The calibration plot: the calibrated estimate and pDC against true Dice, one point per case,
coloured by cohort (``qcloop demo``'s ``calibration.png``). Needs the ``report`` extra."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from qcloop.monitor.core.optional import require
from qcloop.monitor.method.qc_evaluation import case_values

__all__ = ["calibration_png"]


def calibration_png(
    records: Sequence[Mapping[str, Any]],
    *,
    group: str = "cohort",
    structure: str = "RV",
    failure_dice: float = 0.8,
    dpi: int = 90,
) -> bytes:
    """est_dice (left) and pDC (right) against true Dice of ``structure`` per view (rows), as
    PNG bytes; the diagonal is a perfect estimate, the dashed lines the failure threshold."""
    require("matplotlib", "report", "the calibration plot")
    from matplotlib.figure import Figure

    views = sorted({r["view"] for r in records})
    fig = Figure(figsize=(8.0, 3.6 * len(views)), dpi=dpi)
    axes = fig.subplots(len(views), 2, squeeze=False)
    cohorts = sorted({str(r.get(group, "-")) for r in records})
    for row, view in enumerate(views):
        for col, (name, label) in enumerate((("est", "est_dice"), ("pdc", "pDC"))):
            ax = axes[row, col]
            for cohort in cohorts:
                pts = [
                    v
                    for r in records
                    if r["view"] == view and str(r.get(group, "-")) == cohort
                    for v in [case_values(r, structure)]
                    if v is not None
                ]
                ax.scatter([p["true"] for p in pts], [p[name] for p in pts], s=10, label=cohort)
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
            ax.axhline(failure_dice, color="grey", lw=0.6, ls="--")
            ax.axvline(failure_dice, color="grey", lw=0.6, ls="--")
            ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"true {structure} Dice", ylabel=label)
            ax.set_title(f"{view}: {label} vs true Dice", fontsize=9)
        axes[row, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
