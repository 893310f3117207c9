"""How good are the quality estimates? ``qcloop evaluate-qc``'s tables: per vendor, view and
structure, the calibrated estimate (``est_dice``) and the paper's pDC against true Dice.

For each estimate: Pearson and Spearman r, mean absolute error, failure AUROC (a lower estimate
ranks a failed case first; failure: true Dice below ``failure_dice``) and failure accuracy (the
estimate read as "Dice below ``failure_dice``"), and for ``est_dice`` the coverage of its
prediction interval. A high Pearson r alone can flatter a score (it ignores bias), hence MAE
and accuracy beside it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from qcloop.monitor.method.evaluation import auroc, pearson
from qcloop.monitor.method.quality_estimate import record_features

__all__ = ["QC_COLUMNS", "case_values", "qc_markdown", "qc_rows", "spearman"]

STRUCTURES = ("RV", "LV", "MYO")
#: (column, heading) of :func:`qc_markdown`.
QC_COLUMNS = (
    ("n", "n"),
    ("failures", "fail"),
    ("est_spearman", "est ρ"),
    ("pdc_spearman", "pDC ρ"),
    ("est_pearson", "est r"),
    ("pdc_pearson", "pDC r"),
    ("est_mae", "est MAE"),
    ("pdc_mae", "pDC MAE"),
    ("est_coverage", "est cover"),
    ("est_auroc", "est AUROC"),
    ("pdc_auroc", "pDC AUROC"),
    ("est_accuracy", "est acc"),
    ("pdc_accuracy", "pDC acc"),
)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties averaged), or ``None`` where undefined."""
    from scipy.stats import rankdata

    if len(x) < 3:
        return None
    return pearson(rankdata(x), rankdata(y))


def case_values(rec: Mapping[str, Any], structure: str) -> dict[str, Any] | None:
    """True Dice, pDC, the estimate and its interval of one record's structure (``None``
    without ground truth)."""
    true = (rec.get("true_selected") or {}).get(structure)
    if not true or not math.isfinite(true["dice"]):
        return None
    pdc = min(1.0, max(0.0, record_features(rec, structure)["pdc"]))
    est = ((rec.get("estimate") or {}).get("structures") or {}).get(structure)
    return {
        "true": float(true["dice"]),
        "pdc": pdc,
        "est": est["dice"] if est else pdc,
        "lo": est.get("dice_lo") if est else None,
        "hi": est.get("dice_hi") if est else None,
    }


def _figures(values: list[dict[str, Any]], failure_dice: float) -> dict[str, Any]:
    """One table row's figures for a group of cases."""
    true = np.array([v["true"] for v in values])
    failed = true < failure_dice
    row: dict[str, Any] = {"n": len(values), "failures": int(failed.sum())}
    for name in ("est", "pdc"):
        score = np.array([v[name] for v in values])
        row[f"{name}_pearson"] = pearson(score, true)
        row[f"{name}_spearman"] = spearman(score, true)
        row[f"{name}_mae"] = float(np.abs(score - true).mean())
        row[f"{name}_auroc"] = auroc(-score, failed)
        row[f"{name}_accuracy"] = float(((score < failure_dice) == failed).mean())
    bounded = [v for v in values if v["lo"] is not None and v["hi"] is not None]
    row["est_coverage"] = (
        float(np.mean([v["lo"] <= v["true"] <= v["hi"] for v in bounded])) if bounded else None
    )
    return row


def qc_rows(
    records: Iterable[Mapping[str, Any]],
    *,
    failure_dice: float = 0.8,
    group: str = "vendor",
    structures: Sequence[str] = STRUCTURES,
) -> list[dict[str, Any]]:
    """One row per (``group`` value, view, structure) with ground truth, then per (view,
    structure) over all groups (``group`` value ``all``)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for rec in records:
        for s in structures:
            v = case_values(rec, s)
            if v is None:
                continue
            g = str(rec.get(group) or rec.get(group.upper()) or "-")
            groups.setdefault((g, rec["view"], s), []).append(v)
            groups.setdefault(("all", rec["view"], s), []).append(v)
    order = {s: i for i, s in enumerate(structures)}
    keys = sorted(groups, key=lambda k: (k[0] == "all", k[0], k[1], order[k[2]]))
    return [
        {group: g, "view": view, "structure": s, **_figures(groups[(g, view, s)], failure_dice)}
        for g, view, s in keys
    ]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.3f}"


def qc_markdown(rows: Sequence[Mapping[str, Any]], group: str = "vendor") -> str:
    """The rows as a Markdown table."""
    head = [group, "view", "structure", *(h for _, h in QC_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[group]), r["view"], r["structure"], *(_fmt(r[c]) for c, _ in QC_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
