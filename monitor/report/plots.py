"""The report's plots, drawn with matplotlib (Agg, headless) and embedded as PNG data URIs: pDC
against true Dice, the failure ROC, pDC/pHD distributions with the fences, flagged cases per
vendor, and a monitor's window over time with its alerts and refinements."""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from qcloop.monitor.core.optional import require
from qcloop.monitor.method.evaluation import FAILURE_DICE, auroc

__all__ = ["distributions", "flagged_by_vendor", "monitor_timeline", "pdc_vs_dice", "roc"]

_VIEW_COLOURS = {"SA": "#1f77b4", "LA": "#d62728"}


def _figure(width: float = 5.2, height: float = 3.6) -> Any:
    require("matplotlib", "report", "qcloop report")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=90)


def _data_uri(fig: Any) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _by_view(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[r["view"]].append(r)
    return dict(sorted(out.items()))


def pdc_vs_dice(rows: Sequence[dict[str, Any]]) -> str | None:
    """Scatter of pDC against true Dice (decision structure), by view; ``None`` without
    ground truth."""
    have = [r for r in rows if r["pdc"] is not None and r["true_dice"] is not None]
    if not have:
        return None
    fig = _figure()
    ax = fig.subplots()
    for view, group in _by_view(have).items():
        x = [r["true_dice"] for r in group]
        y = [r["pdc"] for r in group]
        r_ = np.corrcoef(x, y)[0, 1] if len(group) > 2 and np.std(x) and np.std(y) else float("nan")
        ax.scatter(
            x, y, s=9, alpha=0.6, color=_VIEW_COLOURS.get(view), label=f"{view} (r {r_:.2f})"
        )
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.axvline(FAILURE_DICE, color="black", lw=0.6, ls=":")
    ax.set(xlabel="true Dice", ylabel="pseudo-Dice", xlim=(0, 1), ylim=(0, 1))
    ax.set_title("pDC against true Dice", fontsize=10)
    ax.legend(fontsize=8)
    return _data_uri(fig)


def _roc_points(
    scores: Sequence[float], positive: Sequence[bool]
) -> tuple[list[float], list[float]]:
    order = np.argsort(-np.asarray(scores), kind="stable")
    pos = np.asarray(positive, bool)[order]
    tp, fp = np.cumsum(pos), np.cumsum(~pos)
    return [0.0, *(fp / max(1, (~pos).sum())).tolist()], [0.0, *(tp / max(1, pos.sum())).tolist()]


def roc(rows: Sequence[dict[str, Any]]) -> str | None:
    """The ROC of ``-pDC`` for failures (true Dice < 0.8), by view; ``None`` without ground
    truth or without both failures and successes."""
    have = [r for r in rows if r["pdc"] is not None and r["true_dice"] is not None]
    curves = []
    for view, group in _by_view(have).items():
        failed = [r["true_dice"] < FAILURE_DICE for r in group]
        if any(failed) and not all(failed):
            scores = [-r["pdc"] for r in group]
            curves.append((view, *_roc_points(scores, failed), auroc(scores, failed)))
    if not curves:
        return None
    fig = _figure(4.2, 3.6)
    ax = fig.subplots()
    for view, fpr, tpr, area in curves:
        ax.plot(fpr, tpr, color=_VIEW_COLOURS.get(view), label=f"{view} (AUROC {area:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"failures (true Dice < {FAILURE_DICE}) found by low pDC", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return _data_uri(fig)


def _fence_values(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    values = {
        round(float(r["fences"][key]), 4) for r in rows if r.get("fences") and key in r["fences"]
    }
    return sorted(values)[:6]  # one per phase in practice


def distributions(rows: Sequence[dict[str, Any]]) -> str | None:
    """Histograms of pDC and pHD per view with the fences (dashed) where records carry them."""
    views = _by_view([r for r in rows if r["pdc"] is not None])
    if not views:
        return None
    fig = _figure(9.0, 2.8 * len(views))
    axes = np.atleast_2d(fig.subplots(len(views), 2))
    for row, (view, group) in enumerate(views.items()):
        for col, (key, fence, label) in enumerate(
            (("pdc", "pdc_low", "pDC"), ("phd_mm", "phd_high", "pHD (mm)"))
        ):
            ax = axes[row, col]
            values = [r[key] for r in group if r[key] is not None]
            ax.hist(values, bins=30, color=_VIEW_COLOURS.get(view, "grey"), alpha=0.75)
            for v in _fence_values(group, fence):
                ax.axvline(v, color="black", ls="--", lw=0.9)
            ax.set_title(f"{view}: {label} ({len(values)} cases; dashed: fences)", fontsize=9)
    return _data_uri(fig)


def flagged_by_vendor(rows: Sequence[dict[str, Any]]) -> str | None:
    """Cases and flagged cases per vendor (site) and view."""
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        c = counts[(r["vendor"], r["view"])]
        c[0] += 1
        c[1] += bool(r["ood"])
    if not counts:
        return None
    keys = sorted(counts)
    fig = _figure(max(4.0, 0.7 * len(keys) + 2), 3.2)
    ax = fig.subplots()
    x = np.arange(len(keys))
    ax.bar(x, [counts[k][0] for k in keys], color="#c8c8c8", label="cases")
    ax.bar(x, [counts[k][1] for k in keys], color="#d62728", label="flagged OoD")
    ax.set_xticks(x, [f"{v}\n{view}" for v, view in keys], fontsize=8)
    ax.set_title("flagged cases per vendor and view", fontsize=10)
    ax.legend(fontsize=8)
    return _data_uri(fig)


def monitor_timeline(
    rows: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]], window: int = 50
) -> str | None:
    """Per view, the rolling OoD fraction and median pDC over the cases in scoring order, with
    alerts (red), refinements (green) and window resets (grey) marked at the case they followed."""
    views = _by_view([r for r in rows if r.get("seq") is not None])
    if not views:
        return None
    fig = _figure(9.0, 2.6 * len(views))
    axes = np.atleast_1d(fig.subplots(len(views), 1))
    marks = {"alert": "#d62728", "refinement": "#2ca02c", "window_reset": "#7f7f7f"}
    for ax, (view, group) in zip(axes, views.items(), strict=True):
        group = sorted(group, key=lambda r: r["seq"])
        seqs = [r["seq"] for r in group]
        flags = np.array([bool(r["ood"]) for r in group], float)
        pdc = np.array([r["pdc"] if r["pdc"] is not None else np.nan for r in group])
        frac = [flags[max(0, i - window + 1) : i + 1].mean() for i in range(len(group))]
        med = [np.nanmedian(pdc[max(0, i - window + 1) : i + 1]) for i in range(len(group))]
        ax.plot(seqs, frac, color="#d62728", label="OoD fraction (window)")
        ax.plot(seqs, med, color="#1f77b4", label="median pDC (window)")
        for e in events:
            if e.get("view") == view and e.get("event") in marks:
                at = e.get("after_seq")
                if isinstance(at, (int, float)):
                    ax.axvline(at, color=marks[e["event"]], lw=1.2, ls="--")
        ax.set(ylim=(0, 1), xlabel="case (order scored)")
        ax.set_title(
            f"{view}: red dashes alerts, green refinements, grey window resets", fontsize=9
        )
        ax.legend(fontsize=7, loc="lower left")
    return _data_uri(fig)
