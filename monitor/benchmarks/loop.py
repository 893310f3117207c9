"""``qcloop bench loop``: what the QC loop costs, measured on phantoms with a real run.

- **Per-case stages**: read, preprocess, segmentation per candidate, QC reconstruction, pDC/pHD,
  selection (judging), restore + write, each timed around the very calls ``assess`` makes
  (:class:`~qcloop.monitor.method.case_worker.ViewScorer`), median over the cases.
- **Throughput and memory against the case count**: ``assess`` over a case list that repeats the
  data's cases under new subject names (N cases without N phantoms to render), in a child
  process per engine and size: cases per second and the driver's peak RSS.
- **Monitor restart** with a ledger of N lines (:mod:`~qcloop.monitor.benchmarks.loop_state`).
- **Refinement cost per epoch** against the flagged window's size (same module).

Every figure goes into one JSON document (``--json``) that a later run compares with
(``--compare``); ratios are taken within one run, as these machines are noisy.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from statistics import median
from typing import Any

__all__ = ["compare_figures", "run_loop_benchmark", "stage_costs", "throughput"]

#: QC (reconstruction + pDC/pHD) may add at most this much to one candidate's segmentation.
QC_COST_TARGET = 0.25


class _Stopwatch:
    """Milliseconds per named stage, one entry per timed block."""

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = {k: [] for k in STAGES}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.ms[stage].append((time.perf_counter() - t0) * 1000.0)


#: The stages of one case, in the order ``assess`` meets them (segment, reconstruct and
#: pseudo_metrics once per candidate).
STAGES = (
    "read", "preprocess", "segment", "reconstruct", "pseudo_metrics", "select", "estimate",
    "restore_write",
)  # fmt: skip
#: The calibrated estimate (its signals and the calibrator) may add this much to scoring.
ESTIMATE_COST_TARGET = 0.05


def _time_case(scorer: Any, src: Any, sw: _Stopwatch, mask_path: Path) -> None:
    """Score one case as :meth:`ViewScorer.score` does, each stage timed."""
    from qcloop.monitor.data import load_case, save_label_map
    from qcloop.monitor.method.assess import reference_fences
    from qcloop.monitor.method.assessment import (
        ScoredCase,
        net_probabilities,
        pseudo_metrics,
        selected_probabilities,
    )
    from qcloop.monitor.method.cases import PreparedCase, restore_labels
    from qcloop.monitor.method.qc_signals import case_signals

    a = scorer.assessor
    estimator = scorer.estimator
    with sw("read"):
        case = load_case(src)
    with sw("preprocess"):
        item = PreparedCase(case, scorer.preprocessor.prepare(case))
    per_candidate, probs = [], []
    for m in scorer.model_set.candidates:
        with sw("segment"):
            p = net_probabilities(m, item.prepared.image, a.batch_size, item.origin)
        with sw("reconstruct"):
            recon = a.reconstruct(p, item.prepared.image)
        with sw("pseudo_metrics"):
            scores = pseudo_metrics(
                p.argmax(1), recon.argmax(1), item.net_spacing, voxel_units=a.voxel_units
            )
        per_candidate.append(scores)
        probs.append(p)
    with sw("select"):
        scored = ScoredCase(item.key, item.net_spacing, per_candidate, a.decision_structure)
        scored.judge(reference_fences(scorer.model_set, case.phase))
    with sw("estimate"):
        scored.extra["signals"] = case_signals(probs, [p.argmax(1) for p in probs])
        if estimator is not None:
            estimator.estimate(scored.to_record())
    with sw("restore_write"):
        labels = restore_labels(item, selected_probabilities(scored, probs))
        save_label_map(mask_path, labels, case)


def stage_costs(run: Path, data: str, view: str, cases: int = 20) -> dict[str, Any]:
    """Median milliseconds per case of each stage of ``assess`` for ``view`` (per candidate for
    segmentation and QC), and QC's cost as a fraction of one candidate's segmentation."""
    from qcloop.monitor.data.case_list import find_cases
    from qcloop.monitor.method.case_worker import ViewJob, ViewScorer
    from qcloop.monitor.method.quality_estimate import ESTIMATOR_FILE

    sources = [s for s in find_cases(data) if s.view == view][:cases]
    if not sources:
        raise ValueError(f"{data}: no {view} case")
    scorer = ViewScorer(ViewJob(view, Path(run), Path(tempfile.gettempdir())))
    sw = _Stopwatch()
    with tempfile.TemporaryDirectory(prefix="qcloop-bench-loop-") as tmp:
        _time_case(scorer, sources[0], _Stopwatch(), Path(tmp) / "mask.nii.gz")  # warm-up
        for src in sources:
            _time_case(scorer, src, sw, Path(tmp) / "mask.nii.gz")
    ms = {k: round(median(v), 2) for k, v in sw.ms.items()}
    qc = ms["reconstruct"] + ms["pseudo_metrics"]
    k = len(scorer.model_set.candidates)
    scoring = ms["read"] + ms["preprocess"] + k * (ms["segment"] + qc) + ms["select"]
    reference = reference_segmenters(scorer, sources[: min(5, len(sources))])
    return {
        "view": view,
        "cases": len(sources),
        "candidates": len(scorer.model_set.candidates),
        "median_ms": ms,
        "qc_over_segmentation": round(qc / ms["segment"], 3) if ms["segment"] else None,
        "reference_segment_ms": reference,
        "qc_over_reference": {k: round(qc / v, 3) for k, v in reference.items()},
        "qc_target": QC_COST_TARGET,
        "estimate_over_scoring": round(ms["estimate"] / scoring, 4) if scoring else None,
        "estimator": (Path(run) / view / ESTIMATOR_FILE).is_file(),
        "estimate_target": ESTIMATE_COST_TARGET,
    }


#: The built-in segmenters at their reference sizes (the paper's networks, not the demo's
#: CPU-sized ones), timed on the same slices to put QC's cost beside a deployed model's.
REFERENCE_ARCHS = ("bn1", "bn2")


def reference_segmenters(scorer: Any, sources: Sequence[Any]) -> dict[str, float]:
    """Median ms per case of each reference-size segmenter (random weights: the cost does not
    depend on them) on the run's grid."""
    from qcloop.monitor.core.resolve import build_segmenter
    from qcloop.monitor.data import load_case
    from qcloop.monitor.method.segmenter_training import predict_probabilities

    images = [scorer.preprocessor.prepare(load_case(s)).image for s in sources]
    out = {}
    for arch in REFERENCE_ARCHS:
        model = build_segmenter(arch, {}).eval()
        predict_probabilities(model, images[0][:1])  # warm-up
        times = []
        for image in images:
            t0 = time.perf_counter()
            predict_probabilities(model, image, scorer.assessor.batch_size)
            times.append((time.perf_counter() - t0) * 1000.0)
        out[arch] = round(median(times), 1)
    return out


def write_repeated_list(data: str, view: str, n: int, path: Path) -> Path:
    """A case list of ``n`` cases of ``view``: the data's cases again and again, each copy
    under a subject name of its own."""
    from qcloop.monitor.data.case_list import find_cases

    sources = [s for s in find_cases(data) if s.view == view]
    if not sources:
        raise ValueError(f"{data}: no {view} case")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "view", "phase", "subject", "gt", "vendor"])
        for i in range(n):
            s = sources[i % len(sources)]
            w.writerow([s.image_path, view, s.phase, f"{s.subject}-{i // len(sources)}",
                        s.gt_path or "", s.vendor])  # fmt: skip
    return path


def _assess_child(cases: str, run: str, out: str, view: str, engine: str, workers: str) -> None:
    """One ``assess`` (run in the measured child process); prints its seconds and counts. For
    Ray the local cluster is started first and its start-up timed apart (``startup_s``)."""
    from qcloop.monitor.method.assess import assess_run

    params: dict[str, Any] = {}
    startup = 0.0
    if engine == "ray":
        import ray

        t0 = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        startup = time.perf_counter() - t0
        params = {"workers": int(workers)}
    t0 = time.perf_counter()
    summary = assess_run(cases, run, out, views=[view], engine=engine, engine_params=params)
    seconds = time.perf_counter() - t0
    emit({"seconds": seconds, "startup_s": round(startup, 2), "cases": summary["cases"]})


def peak_rss_mib() -> float | None:
    """This process's peak resident memory since it started its program, in MiB (Linux:
    ``VmHWM``). ``getrusage``/``wait4`` would also count the parent's memory at fork, which
    Linux carries into a child's ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def emit(figures: dict[str, Any]) -> None:
    """Print a child's figures as its last line of output, with its peak RSS."""
    peak = peak_rss_mib()
    print(json.dumps({**figures, **({"peak_rss_mib": peak} if peak is not None else {})}))


def run_child(module: str, function: str, args: Sequence[str]) -> dict[str, Any]:
    """Run ``module.function(*args)`` in a child process; the JSON it printed last (by
    :func:`emit`, with its peak RSS in MiB) and the wall seconds."""
    code = f"import sys; from {module} import {function} as f; f(*sys.argv[1:])"
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=err
        )
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
    if proc.returncode:
        raise RuntimeError(f"{function} failed ({proc.returncode}): " + " | ".join(tail))
    out = json.loads(stdout.decode().strip().splitlines()[-1])
    if "peak_rss_mib" not in out:  # the child could not read its own high-water mark
        out["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def throughput(
    run: Path, data: str, view: str, sizes: Sequence[int], engines: Sequence[str]
) -> list[dict[str, Any]]:
    """Cases per second and peak driver RSS of ``assess`` per engine (``local``, ``ray1``,
    ``ray2``: Ray with 1 or 2 workers) and case count."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcloop-bench-loop-") as tmp:
        for n in sizes:
            cases = write_repeated_list(data, view, n, Path(tmp) / f"cases-{n}.csv")
            for engine in engines:
                name, workers = (
                    ("ray", engine[3:] or "1") if engine.startswith("ray") else (engine, "0")
                )
                out = Path(tmp) / f"out-{engine}-{n}"
                args = [str(cases), str(run), str(out), view, name, workers]
                r = run_child(__name__, "_assess_child", args)
                r.update(engine=engine, size=n, cases_per_s=round(r["cases"] / r["seconds"], 2))
                r["ms_per_case"] = round(1000 * r["seconds"] / max(1, r["cases"]), 1)
                rows.append(r)
    return rows


def linearity(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per engine, between the smallest and the largest size: the marginal ms per case (what
    each further case costs, start-up excluded), ms per case at the largest size over the
    smallest (1.0 = linear; below 1 a fixed start-up is being spread), and the growth of the
    driver's peak RSS in MiB (0 = flat)."""
    out: dict[str, Any] = {}
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = sorted((r for r in rows if r["engine"] == engine), key=lambda r: r["size"])
        if len(mine) > 1:
            lo, hi = mine[0], mine[-1]
            marginal = 1000 * (hi["seconds"] - lo["seconds"]) / max(1, hi["cases"] - lo["cases"])
            out[engine] = {
                "sizes": [lo["size"], hi["size"]],
                "marginal_ms_per_case": round(marginal, 1),
                "ms_per_case_ratio": round(hi["ms_per_case"] / lo["ms_per_case"], 3),
                "peak_rss_growth_mib": round(hi["peak_rss_mib"] - lo["peak_rss_mib"], 1),
            }
    return out


def run_loop_benchmark(
    run: Path,
    data: Path,
    *,
    views: Sequence[str] = ("SA",),
    stage_cases: int = 20,
    sizes: Sequence[int] = (100, 1000),
    engines: Sequence[str] = ("local", "ray1", "ray2"),
    ledger_lines: int = 100_000,
    windows: Sequence[int] = (4, 8, 16),
    command: str = "",
) -> dict[str, Any]:
    """Every figure of the loop benchmark, with the command that produced it (``command``) and
    the load average before and after."""
    from qcloop.monitor.benchmarks.loop_state import ledger_restart, refinement_cost

    figures: dict[str, Any] = {
        "command": command,
        "run": str(Path(run).resolve()),
        "data": str(Path(data).resolve()),
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    figures["stages"] = {v: stage_costs(run, str(data), v, stage_cases) for v in views}
    rows = throughput(run, str(data), views[0], sizes, engines) if sizes and engines else []
    figures["throughput"] = {"view": views[0], "rows": rows, "linearity": linearity(rows)}
    figures["ledger_restart"] = ledger_restart(ledger_lines) if ledger_lines else None
    figures["refinement"] = (
        {"view": views[0], "rows": refinement_cost(run, data, views[0], list(windows))}
        if windows
        else None
    )
    figures["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return figures


def flat(figures: Any, prefix: str = "") -> dict[str, float]:
    """Every number of a figures document by its path (``throughput.rows[local@100].cases_per_s``)."""
    out: dict[str, float] = {}
    if isinstance(figures, dict):
        for k, v in figures.items():
            if k not in ("load_before", "load_after", "cpus"):
                out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(figures, list):
        for i, v in enumerate(figures):
            key = _row_key(v) if isinstance(v, dict) else str(i)
            out.update(flat(v, f"{prefix}[{key}]"))
    elif isinstance(figures, (int, float)) and not isinstance(figures, bool):
        out[prefix] = float(figures)
    return out


def _row_key(row: dict[str, Any]) -> str:
    if "engine" in row:
        return f"{row['engine']}@{row['size']}"
    if "window" in row:
        return f"window {row['window']}"
    return "?"


def compare_figures(
    previous: dict[str, Any], now: dict[str, Any]
) -> list[tuple[str, float, float, float | None]]:
    """``(figure, previous, now, change in %)`` for every number both documents have."""
    before, after = flat(previous), flat(now)
    rows = []
    for key in after:
        if key in before:
            old, new = before[key], after[key]
            rows.append((key, old, new, round(100 * (new - old) / old, 1) if old else None))
    return rows
