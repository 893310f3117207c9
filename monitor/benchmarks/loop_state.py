"""The long-life costs of ``qcloop bench loop``: how long the monitor takes to reopen its state
after months of cases (a ledger of N lines), and what one refinement epoch costs against the
size of the flagged window."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["ledger_restart", "refinement_cost", "write_ledger"]


def write_ledger(out: Path, lines: int) -> None:
    """``out/records.jsonl`` and ``out/ledger.jsonl`` of a monitor that scored ``lines`` cases
    (one record and one ``case`` entry each; per view an alert and a window reset every
    1,000)."""
    from qcloop.monitor.ops.ledger import case_entry

    out.mkdir(parents=True, exist_ok=True)
    with (out / "records.jsonl").open("w") as rec_f, (out / "ledger.jsonl").open("w") as led_f:
        for i in range(1, lines + 1):
            view = "SA" if i % 2 else "LA"
            record = {
                "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
                "seq": i,
                "case_id": f"case-{i:07d}",
                "subject": f"{i:07d}",
                "view": view,
                "phase": "ED" if i % 4 < 2 else "ES",
                "vendor": "A",
                "source_file": f"/inbox/case-{i:07d}_{view}.nii.gz",
                "processed": f"/out/processed/case-{i:07d}_{view}.nii.gz",
                "mask": f"/out/masks/case-{i:07d}_{view}_pred.nii.gz",
                "ood": i % 7 == 0,
                "decision_structure": "RV",
                "candidates": [_scores(0.8 + (i % 10) / 100 - c / 50) for c in range(3)],
                "model": {"name": f"qcloop-{view}", "version": "1"},
                "scored_at": "2026-12-02T00:00:00+00:00",
            }
            rec_f.write(json.dumps(record) + "\n")
            led_f.write(json.dumps(case_entry(record)) + "\n")
            for v in ("SA", "LA") if i % 1000 == 0 else ():
                led_f.write(json.dumps({"event": "alert", "view": v, "seq": i}) + "\n")
                led_f.write(json.dumps({"event": "window_reset", "view": v}) + "\n")


def _scores(pdc: float) -> dict[str, dict[str, Any]]:
    """One candidate's scores as a record holds them."""
    one = {"pdc": pdc, "phd_mm": 6.5, "phd95_mm": 4.2, "penalised": False}
    return {s: dict(one) for s in ("LV", "MYO", "RV")}


def _restart_child(out: str) -> None:
    """Open the ledger as a monitor's start does (run in the measured child process)."""
    from qcloop.monitor.ops.ledger import Ledger

    t0 = time.perf_counter()
    ledger = Ledger(Path(out))
    history = {v: len(ledger.history(v, "1").cases) for v in ("SA", "LA")}
    seconds = time.perf_counter() - t0
    from qcloop.monitor.benchmarks.loop import emit

    emit({"seconds": seconds, "entries": len(ledger.done), "window": history})


def ledger_restart(lines: int) -> dict[str, Any]:
    """Seconds and peak RSS of reopening a monitor's state of ``lines`` scored cases."""
    from qcloop.monitor.benchmarks.loop import run_child

    with tempfile.TemporaryDirectory(prefix="qcloop-bench-ledger-") as tmp:
        write_ledger(Path(tmp), lines)
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        r = run_child(__name__, "_restart_child", [tmp])
    r.update(lines=lines, state_mib=round(size / 2**20, 1))
    r["us_per_line"] = round(1e6 * r["seconds"] / lines, 2)
    return r


def refinement_cost(run: Path, data: Path, view: str, windows: list[int]) -> list[dict[str, Any]]:
    """Per flagged-window size: seconds per candidate epoch of the configured refiner (the
    data's flagged cases, the first ``k`` of them)."""
    from qcloop.monitor.method.cases import make_preprocessor
    from qcloop.monitor.method.refine import assess_window, refine_run
    from qcloop.monitor.method.run_folder import load_model_set, load_run_config

    cfg = load_run_config(run)
    model_set = load_model_set(run, view, cfg)
    pre = make_preprocessor(cfg, getattr(model_set.best, "divisor", 1))
    n, flagged = assess_window(model_set, cfg, data, pre, None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcloop-bench-refine-") as tmp:
        if flagged:  # warm-up (first-call allocations), not recorded
            refine_run(data, run, Path(tmp) / "warm-up", views=[view],
                       assessed_by_view={view: (n, flagged[:1])})  # fmt: skip
        for k in sorted(set(windows)):
            window = flagged[:k]
            if not window:
                break
            t0 = time.perf_counter()
            info = refine_run(
                data, run, Path(tmp) / f"refined-{k}", views=[view],
                assessed_by_view={view: (n, window)},
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            epochs = sum(len(h.get("epochs", [])) for h in info["views"][view]["history"])
            rows.append(
                {
                    "window": len(window),
                    "seconds": round(seconds, 2),
                    "candidate_epochs": epochs,
                    "s_per_epoch": round(seconds / max(1, epochs), 3),
                }
            )
            if len(window) < k:
                break  # fewer flagged cases than asked: larger windows would repeat this one
    return rows
