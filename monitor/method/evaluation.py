"""Evaluation against ground truth: the paper's ablation (``M``, ``M+QC``, ``full``), the QC
module's agreement with true metrics (Pearson r), and how well pDC ranks failed cases (AUROC).

True metrics are computed on the ORIGINAL image grid, in mm, after restoring the network-grid
prediction: what a user of the masks would measure.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor.method.assessment import selected_probabilities
from qcloop.monitor.method.segmentation_metrics import compute_metrics

STRUCTURES = ("RV", "LV", "MYO")
FAILURE_DICE = 0.8


@dataclass
class CaseEvaluation:
    """One case's true metrics for the best single model and for the QC-selected output."""

    key: dict[str, Any]
    ood: bool
    true_m: dict[str, dict[str, float]]
    true_selected: dict[str, dict[str, float]]
    pseudo_m: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.key,
            "ood": self.ood,
            "true_M": self.true_m,
            "true_selected": self.true_selected,
            "pseudo_M": self.pseudo_m,
        }


def evaluate_assessed(a: Any) -> CaseEvaluation:
    """True metrics of an assessed case (``qcloop.monitor.method.assess.Assessed``) with ground truth."""
    from qcloop.monitor.method.cases import restore_labels

    case = a.item.case
    if case.gt is None:
        raise ValueError(f"{case.source.image_path}: no ground truth to evaluate against")
    m_labels = restore_labels(a.item, a.probs[0])
    sel_labels = restore_labels(a.item, selected_probabilities(a.scored, a.probs))
    return CaseEvaluation(
        key=dict(a.item.key),
        ood=bool(a.scored.ood),
        true_m=_true(m_labels, case.gt, case.spacing),
        true_selected=_true(sel_labels, case.gt, case.spacing),
        pseudo_m={s: {"pdc": v.dice, "phd": v.hd} for s, v in a.scored.candidates[0].items()},
    )


def _true(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]
) -> dict[str, dict[str, float]]:
    scores = compute_metrics(pred, gt, spacing)
    return {
        s: {"dice": v.dice, "hd": v.hd, "hd95": v.hd95, "missing": v.penalised}
        for s, v in scores.items()
    }


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson r, or ``None`` when it is undefined (fewer than 3 points or a constant series)."""
    a, b = np.asarray(x, float), np.asarray(y, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for the ``positive`` class (ties count half);
    ``None`` when one class is empty."""
    s = np.asarray(scores, float)
    p = np.asarray(positive, bool)
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    greater = (s[p][:, None] > s[~p][None, :]).sum()
    ties = (s[p][:, None] == s[~p][None, :]).sum()
    return float((greater + 0.5 * ties) / (n_pos * n_neg))


def ablation_tables(
    base: Iterable[CaseEvaluation], full: Iterable[CaseEvaluation]
) -> dict[str, list[dict[str, Any]]]:
    """``rows``, ``qc`` and ``ood`` tables of ``ablation.json``."""
    base, full = list(base), list(full)
    rows: list[dict[str, Any]] = []
    qc: list[dict[str, Any]] = []
    ood: list[dict[str, Any]] = []
    groups = sorted({(e.key["vendor"], e.key["view"]) for e in base})
    for vendor, view in groups:
        b = [e for e in base if (e.key["vendor"], e.key["view"]) == (vendor, view)]
        f = [e for e in full if (e.key["vendor"], e.key["view"]) == (vendor, view)]
        for structure in STRUCTURES:
            for config, evals, field in (
                ("M", b, "true_m"),
                ("M+QC", b, "true_selected"),
                ("full", f, "true_selected"),
            ):
                if not evals:
                    continue
                vals = [getattr(e, field)[structure] for e in evals]
                hd = [v["hd"] for v in vals]
                rows.append(
                    {
                        "config": config,
                        "vendor": vendor,
                        "view": view,
                        "structure": structure,
                        "dice": float(np.mean([v["dice"] for v in vals])),
                        "hd_mm": float(np.mean(hd)),
                        "hd_median_mm": float(np.median(hd)),
                        # a structure absent from the prediction: its HD is the FOV-diagonal
                        # penalty (hundreds of mm), which dominates a mean over 40 cases
                        "n_missing": (
                            sum(bool(v["missing"]) for v in vals)
                            if all("missing" in v for v in vals)
                            else None  # evaluations written before the flag was recorded
                        ),
                        "n_cases": len(vals),
                    }
                )
            qc.append(
                {
                    "vendor": vendor,
                    "view": view,
                    "structure": structure,
                    "pearson_dice": pearson(
                        [e.pseudo_m[structure]["pdc"] for e in b],
                        [e.true_m[structure]["dice"] for e in b],
                    ),
                    "pearson_hd": pearson(
                        [e.pseudo_m[structure]["phd"] for e in b],
                        [e.true_m[structure]["hd"] for e in b],
                    ),
                }
            )
        ood.append(
            {
                "vendor": vendor,
                "view": view,
                "flagged": sum(e.ood for e in b),
                "n_cases": len(b),
                "failures": sum(e.true_m["RV"]["dice"] < FAILURE_DICE for e in b),
                "auroc_failure": auroc(
                    [-e.pseudo_m["RV"]["pdc"] for e in b],
                    [e.true_m["RV"]["dice"] < FAILURE_DICE for e in b],
                ),
            }
        )
    return {"rows": rows, "qc": qc, "ood": ood}


def evaluations_from_jsonl(path: str | Path) -> tuple[list[CaseEvaluation], list[CaseEvaluation]]:
    """The (M/M+QC, full) case evaluations written by the demo to ``evaluations.jsonl``, so the
    tables can be rebuilt without running the models again."""
    base: list[CaseEvaluation] = []
    full: list[CaseEvaluation] = []
    key_fields = ("subject", "view", "phase", "vendor", "disease", "image")
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            ev = CaseEvaluation(
                key={k: d[k] for k in key_fields if k in d},
                ood=bool(d["ood"]),
                true_m=d["true_M"],
                true_selected=d["true_selected"],
                pseudo_m=d["pseudo_M"],
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}:{n}: not a demo evaluation record ({exc})") from exc
        (full if d.get("config") == "full" else base).append(ev)
    return base, full


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def ablation_markdown(tables: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> str:
    """The ablation as a Markdown report."""
    lines = ["# qcloop demo: ablation on phantom cohorts", ""]
    lines.append(
        f"Trained on vendor A; evaluated on vendor A test subjects and on shifted vendors B and C. "
        f"Command: `{meta.get('command', 'qcloop demo')}`; {meta.get('seconds', 0):.0f} s."
    )
    lines += ["", "## Segmentation (true metrics on the original grid; HD in mm)", ""]
    lines.append(
        "| vendor | view | structure | M Dice | M+QC Dice | full Dice | M HD | M+QC HD | full HD | n |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    index = {(r["config"], r["vendor"], r["view"], r["structure"]): r for r in tables["rows"]}
    keys = sorted(
        {(r["vendor"], r["view"], r["structure"]) for r in tables["rows"]},
        key=lambda k: (k[0], k[1], STRUCTURES.index(k[2])),
    )
    for vendor, view, structure in keys:
        cells = [index.get((c, vendor, view, structure)) for c in ("M", "M+QC", "full")]
        dice = [_fmt(c["dice"]) if c else "-" for c in cells]
        hd = [_fmt(c["hd_mm"], 2) if c else "-" for c in cells]
        n = cells[0]["n_cases"] if cells[0] else 0
        lines.append(f"| {vendor} | {view} | {structure} | " + " | ".join(dice + hd) + f" | {n} |")
    lines += [
        "",
        "Mean HD counts a structure missing from a prediction at the field-of-view diagonal "
        "(hundreds of mm), so one missing structure dominates a mean over 40 cases. The median "
        "and the number of predictions missing the structure tell those cases apart:",
        "",
        "| vendor | view | structure | M HD median | M+QC HD median | full HD median "
        "| M missing | M+QC missing | full missing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for vendor, view, structure in keys:
        cells = [index.get((c, vendor, view, structure)) for c in ("M", "M+QC", "full")]
        med = [_fmt(c.get("hd_median_mm"), 2) if c else "-" for c in cells]
        miss = [
            ("n/a" if c.get("n_missing") is None else str(c["n_missing"])) if c else "-"
            for c in cells
        ]
        lines.append(f"| {vendor} | {view} | {structure} | " + " | ".join(med + miss) + " |")
    lines += ["", "## QC agreement (Pearson r, pseudo vs true, best single model)", ""]
    lines.append("| vendor | view | structure | r Dice | r HD |")
    lines.append("|---|---|---|---|---|")
    for q in tables["qc"]:
        lines.append(
            f"| {q['vendor']} | {q['view']} | {q['structure']} | "
            f"{_fmt(q['pearson_dice'])} | {_fmt(q['pearson_hd'])} |"
        )
    lines += ["", f"## OoD flags (failure = true RV Dice < {FAILURE_DICE})", ""]
    lines.append("| vendor | view | flagged | cases | failures | AUROC pDC vs failure |")
    lines.append("|---|---|---|---|---|---|")
    for o in tables["ood"]:
        lines.append(
            f"| {o['vendor']} | {o['view']} | {o['flagged']} | {o['n_cases']} | "
            f"{o['failures']} | {_fmt(o['auroc_failure'])} |"
        )
    lines.append("")
    lines.append("`n/a`: undefined (a constant series, or no failure / no success to rank).")
    return "\n".join(lines) + "\n"
