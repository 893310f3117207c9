"""``qcloop bench report``: the size and build time of ``qcloop report`` pages for growing
numbers of cases, on synthetic assess outputs (records with ground truth, fences, a figure per
flagged case and a mask per case, as ``qcloop predict --figures flagged`` writes them)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor.core import atomic

__all__ = ["run_report_benchmark", "synthetic_output"]

#: A 1x1 PNG: the figures' content does not matter to the page, which only links them.
_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201e221bc330000000049454e44ae426082"
)


def synthetic_output(folder: Path, cases: int, seed: int = 0, *, monitor: bool = False) -> Path:
    """An assess/predict output folder of ``cases`` records (two views, three vendors; about
    a third flagged, each with its figure); with ``monitor`` a monitor's folder instead (cases
    in scoring order, a ledger with one alert and one refinement per view halfway); returns
    ``folder``."""
    rng = np.random.default_rng(seed)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    lines = []
    for i in range(cases):
        view, phase = ("SA", "LA")[i % 2], ("ED", "ES")[(i // 2) % 2]
        vendor = "ABC"[rng.integers(0, 3)]
        true = float(np.clip(rng.normal(0.85 if vendor == "A" else 0.7, 0.12), 0, 1))
        pdc = float(np.clip(true - 0.08 + rng.normal(0, 0.07), 0, 1))
        phd = float(np.clip(40 * (1 - pdc) + rng.normal(0, 3), 1, 300))
        ood = bool(pdc < 0.65 or phd > 20)
        name = f"{i:06d}_{view}_{phase}"
        mask = folder / "masks" / f"{name}_pred.nii.gz"
        mask.write_bytes(b"")
        rec: dict[str, Any] = {
            "subject": f"{i:06d}", "view": view, "phase": phase, "vendor": vendor,
            "decision_structure": "RV",
            "candidates": [{"RV": {"pdc": pdc, "phd_mm": phd, "penalised": False}}],
            "fences": {"pdc_low": 0.65, "phd_high": 20.0}, "ood": ood,
            "selection": {"kind": "candidate", "index": 0},
            "true_selected": {"RV": {"dice": true, "hd_mm": phd}}, "mask": str(mask),
        }  # fmt: skip
        if ood:
            figure = folder / "figures" / f"{name}.png"
            figure.write_bytes(_PNG)
            rec["figure"] = str(figure)
        if monitor:
            rec.update({"seq": i + 1, "case_id": f"{name}-{i:010x}"})
        lines.append(json.dumps(rec) + "\n")
    atomic.write_text(folder / "records.jsonl", "".join(lines))
    if monitor:
        _ledger(folder, cases)
    else:
        atomic.write_json(folder / "summary.json", {"cases": cases})
    return folder


def _ledger(folder: Path, cases: int) -> None:
    """A monitor's ledger for the synthetic records: one alert and one refinement per view
    after half the cases."""
    entries: list[dict[str, Any]] = []
    for i in range(cases):
        entries.append({"event": "case", "seq": i + 1, "view": ("SA", "LA")[i % 2]})
        if i == cases // 2:
            for view in ("SA", "LA"):
                entries.append({"event": "alert", "view": view, "seq": i + 1})
                entries.append({"event": "refinement", "view": view})
    atomic.write_text(folder / "ledger.jsonl", "".join(json.dumps(e) + "\n" for e in entries))


def run_report_benchmark(sizes: tuple[int, ...] = (1_000, 10_000)) -> list[dict[str, Any]]:
    """Per size: the page's bytes, its build time, and the bytes per case."""
    from qcloop.monitor.report.page import write_report

    figures = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="qcloop-bench-report-") as tmp:
            folder = synthetic_output(Path(tmp) / "out", n)
            info = write_report(folder, folder / "report.html")
        figures.append(
            {"cases": n, "bytes": info["bytes"], "seconds": round(info["seconds"], 2),
             "bytes_per_case": round(info["bytes"] / n, 1)}
        )  # fmt: skip
    return figures
