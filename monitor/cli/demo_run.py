"""``qcloop demo``: the paper's ablation on built-in phantom cohorts, end to end.

Generates the cohort, trains M (keeping m_best candidates) and R for both views on vendor A,
then evaluates on vendor A test subjects and shifted vendors B and C:

* ``M``: the best single checkpoint;
* ``M+QC``: QC-based selection among the candidates, no refinement;
* ``full``: refinement of every candidate on the flagged cases, then selection.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qcloop.monitor.cli.demo_estimate import estimate_stage, estimates_markdown
from qcloop.monitor.core import atomic
from qcloop.monitor.core.config import QcloopConfig, dump_config
from qcloop.monitor.core.interfaces import Tracker
from qcloop.monitor.core.tracking import make_tracker
from qcloop.monitor.method.assess import Assessed, assess_prepared, flag_collector
from qcloop.monitor.method.cases import load_prepared, make_preprocessor, sources_for
from qcloop.monitor.method.evaluation import (
    CaseEvaluation,
    ablation_markdown,
    ablation_tables,
    evaluate_assessed,
)
from qcloop.monitor.method.refine import refine_run
from qcloop.monitor.method.run_folder import load_model_set
from qcloop.monitor.method.train import train_run

log = logging.getLogger(__name__)

TEST_SPLIT = {"SPLIT": "test"}


def demo_config(quick: bool, seed: int = 0) -> QcloopConfig:
    """The demo's configuration: CPU-sized networks, the paper's method otherwise.

    Departures from the reference sizes, for a 2-core CPU: BN2 (Adam converges in hundreds of
    steps, BN1's SGD recipe needs thousands) at base width 8; a QC autoencoder at half width with
    dropout 0.2 and Adam 1e-3 (the reference dropout 0.5 and lr 2e-4 keep a small autoencoder at
    all-background for many epochs); 128 px at 1.8 mm (``--quick``: 64 px at 3.6 mm).
    """
    size, spacing, depth = (64, 3.6, 4) if quick else (128, 1.8, 5)
    return QcloopConfig.model_validate(
        {
            "seed": seed,
            "views": ["SA", "LA"],
            "preprocessing": {"size": size, "target_spacing_mm": spacing},
            "segmenter": {"name": "bn2", "params": {"base_width": 8, "depth": depth}},
            "training": {
                "epochs": 15 if quick else 26,
                "batch_size": 8,
                "m_best": 3,
                "max_slices_per_epoch": 160,
                "min_steps": 300 if quick else 500,
            },
            "qc": {
                "module": {
                    "name": "autoencoder",
                    "params": {"width_scale": 0.5, "dropout": 0.2, "lr": 1e-3},
                },
                "input": "softmax",
                "epochs": 4 if quick else 5,
                "batch_size": 16,
                "min_steps": 300 if quick else 400,
            },
            "assessment": {
                "decision_structure": "RV",
                "hd_units": "mm",
                "thresholds": {"name": "iqr", "params": {"k": 1.5}},
                "population": "reference",
            },
            "refinement": {
                "refiner": {
                    "name": "alpha",
                    "params": {"k_semi": 2, "max_slices_per_epoch": 64 if quick else 96},
                },
            },
        }
    )


def evaluate_run(
    run: Path,
    data: Path,
    cfg: QcloopConfig,
    flagged: dict[str, tuple[int, list[Assessed]]] | None = None,
) -> list[CaseEvaluation]:
    """True and pseudo metrics of every test case, for the best candidate and the selection.

    With ``flagged``, each view's (case count, OoD cases) is stored there for the refinement.
    """
    evals: list[CaseEvaluation] = []
    for view in cfg.views:
        model_set = load_model_set(run, view, cfg)
        pre = make_preprocessor(cfg, getattr(model_set.best, "divisor", 1))
        cases = load_prepared(sources_for(data, [view], TEST_SPLIT), pre)
        ood: list[Assessed] = []
        keep_ood = flag_collector(ood)

        def collect(a: Assessed, keep_ood: Callable[[Assessed], None] = keep_ood) -> None:
            evals.append(evaluate_assessed(a))
            if flagged is not None:
                keep_ood(a)

        assess_prepared(model_set, cases, cfg, collect)
        if flagged is not None:
            flagged[view] = (len(cases), ood)
    return evals


def run_demo(
    out: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    workers: int | None = None,
    preset: str | None = None,
    config: QcloopConfig | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the whole demo into ``out``; returns the ablation tables (also written to disk).

    ``preset`` and ``config`` override the phantom preset and configuration that ``quick``
    chooses (tests use the tiny preset with tiny networks); ``command`` is the command line
    recorded with the results (default: the ``qcloop demo`` line these arguments make).
    With ``tracking.tracker`` configured, the demo is one tracked run holding the training and
    refinement runs, the ablation table as metrics and its files as artifacts.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    cfg = config or demo_config(quick, seed)
    preset = preset or ("small" if quick else "default")
    atomic.write_text(out / "config.yaml", dump_config(cfg))

    tracker = make_tracker(cfg)
    with tracker.start_run(f"demo {out.name}", tags={"qcloop.kind": "demo"}):
        tracker.log_params({"quick": quick, "seed": seed, "preset": preset})
        command = command or f"qcloop demo{' --quick' if quick else ''} --out {out}"
        result = _run_demo(out, cfg, command, seed, workers, preset, tracker, t0, timings)
        _log_demo(tracker, out, result)
    return result


def _log_demo(tracker: Tracker, out: Path, result: dict[str, Any]) -> None:
    """The ablation table (mean Dice and HD per configuration, vendor, view and structure as
    metrics), its files and any figure in ``out``."""
    metrics: dict[str, float] = {"seconds": float(result["meta"]["seconds"])}
    for row in result.get("rows", []):
        key = f"{row['config']}.{row['vendor']}.{row['view']}.{row['structure']}"
        metrics[f"{key}.dice"] = float(row["dice"])
        metrics[f"{key}.hd_mm"] = float(row["hd_mm"])
    tracker.log_metrics(metrics)
    for name in ("ablation.json", "ablation.md", "evaluations.jsonl", "config.yaml"):
        if (out / name).is_file():
            tracker.log_artifact(str(out / name))
    for figure in sorted([*out.glob("*.png"), *out.glob("*.svg")]):
        tracker.log_artifact(str(figure), "figures")


@contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    """Time the block as ``timings[name]`` (seconds)."""
    t = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t


def _run_demo(
    out: Path,
    cfg: QcloopConfig,
    command: str,
    seed: int,
    workers: int | None,
    preset: str,
    tracker: Tracker,
    t0: float,
    timings: dict[str, float],
) -> dict[str, Any]:
    from qcloop.monitor.phantoms import write_cohort

    data = out / "data"
    write_cohort(data, preset=preset, seed=seed, workers=workers)
    timings["phantoms"] = time.perf_counter() - t0
    with _stage(timings, "train"):
        train_run(data, out / "run", cfg, tracker=tracker)
    flagged: dict[str, tuple[int, list[Assessed]]] = {}
    with _stage(timings, "assess"):
        base = evaluate_run(out / "run", data, cfg, flagged)
    with _stage(timings, "refine"):
        if (out / "run-refined").exists():  # a previous demo's: made again from this run
            shutil.rmtree(out / "run-refined")
        refine_run(
            data,
            out / "run",
            out / "run-refined",
            cfg,
            where=TEST_SPLIT,
            assessed_by_view=flagged,
            tracker=tracker,
        )
        del flagged
    with _stage(timings, "assess_refined"):
        full = evaluate_run(out / "run-refined", data, cfg)
    tables: dict[str, Any] = dict(ablation_tables(base, full))
    with _stage(timings, "estimate"):
        tables["qc_estimates"] = estimate_stage(out, data, out / "run", cfg, tracker)
    meta = {
        "command": command,
        "seconds": time.perf_counter() - t0,
        "timings_s": timings,
        "preset": preset,
        "seed": seed,
    }
    _write_results(out, tables, meta, base, full)
    return {**tables, "meta": meta}


def _write_results(
    out: Path,
    tables: dict[str, Any],
    meta: dict[str, Any],
    base: list[CaseEvaluation],
    full: list[CaseEvaluation],
) -> None:
    """``ablation.json``, ``ablation.md`` and every case's evaluation (``evaluations.jsonl``)."""
    atomic.write_json(out / "ablation.json", {**tables, "meta": meta})
    md = ablation_markdown(tables, meta)
    if "qc_estimates" in tables:
        md += estimates_markdown(tables["qc_estimates"])
    atomic.write_text(out / "ablation.md", md)
    atomic.write_text(
        out / "evaluations.jsonl",
        "".join(json.dumps({"config": "M/M+QC", **e.to_dict()}) + "\n" for e in base)
        + "".join(json.dumps({"config": "full", **e.to_dict()}) + "\n" for e in full),
    )
