"""Inference speed of the segmenters: PyTorch eager vs ONNX Runtime (CPU) in the same run.

For each architecture (built with its default parameters, the reference widths) the network is
exported to ONNX once (dynamic batch, height and width), then both backends run the same input
at each size and batch. Figures: slices per second, the ONNX Runtime / PyTorch ratio, and the
achieved GFLOP/s against the fp32 matrix-multiply rate measured in the same run (torch matmul,
large square matrices). FLOPs are counted once per input shape with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products, two FLOPs per
multiply-add; element-wise work is not counted).

Targets (issue 5): ONNX Runtime >= 1.3x PyTorch eager at batch 1 and >= 1.8x at batch 16;
achieved GFLOP/s >= 90 % of the sgemm rate. They are reported as PASS/MISS, never asserted.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["TARGETS", "run_inference_benchmark", "sgemm_gflops"]

#: Target ONNX Runtime / PyTorch-eager speed ratio by batch size, and the GFLOP/s fraction.
TARGETS: dict[str, float] = {"ratio_batch_1": 1.3, "ratio_batch_16": 1.8, "sgemm_fraction": 0.9}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _timed_pair(
    first: Callable[[], Any], second: Callable[[], Any], repeats: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Call times of two functions measured alternately (a, b, a, b, ...), so that both see the
    same background load on a shared machine."""
    for _ in range(warmup):
        first()
        second()
    times_a: list[float] = []
    times_b: list[float] = []
    for _ in range(repeats):
        for fn, times in ((first, times_a), (second, times_b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times_a, times_b


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 matrix-multiply rate of torch (``n x n`` by ``n x n``), GFLOP/s, best of ``repeats``."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    times = _timed(lambda: torch.matmul(a, b, out=out), repeats, warmup=1)
    return 2.0 * n**3 / min(times) / 1e9


def _count_flops(model: Any, x: Any) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def _target_ratio(batch: int) -> float | None:
    return {1: TARGETS["ratio_batch_1"], 16: TARGETS["ratio_batch_16"]}.get(batch)


def _build_models(archs: Sequence[str], sizes: Sequence[int], seed: int) -> dict[str, Any]:
    """Each registered segmenter of ``archs`` with its default parameters, in eval mode;
    every size must be a multiple of its divisor."""
    import torch

    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    registry = get_plugin_manager().segmenters()
    torch.manual_seed(seed)
    models = {arch: registry.create(arch, {}).eval() for arch in archs}
    for arch, model in models.items():
        divisor = int(getattr(model, "divisor", 1))
        for size in sizes:
            if size % divisor:
                raise ValueError(f"size {size} is not a multiple of {arch}'s divisor {divisor}")
    return models


def _ort_session(path: Path, threads: int) -> Any:
    """A CPU session of the model at ``path``: ``threads`` intra-op threads, all optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _timed_row(
    model: Any, session: Any, x_np: np.ndarray, repeats: int, warmup: int
) -> dict[str, Any]:
    """Both backends on the same input ``x_np`` (batch, 1, size, size), timed alternately."""
    import torch

    x = torch.from_numpy(x_np)
    batch = len(x_np)
    flops = _count_flops(model, x)
    name = session.get_inputs()[0].name

    def run_torch() -> None:
        with torch.inference_mode():
            model(x)

    def run_ort() -> None:
        session.run(None, {name: x_np})

    torch_times, ort_times = _timed_pair(run_torch, run_ort, repeats, warmup)
    t_torch = statistics.median(torch_times)
    t_ort = statistics.median(ort_times)
    return {
        "gflop_per_slice": flops / batch / 1e9,
        "torch_s": t_torch,
        "ort_s": t_ort,
        "torch_slices_per_s": batch / t_torch,
        "ort_slices_per_s": batch / t_ort,
        "ratio": t_torch / t_ort,
        "torch_gflops": flops / t_torch / 1e9,
        "ort_gflops": flops / t_ort / 1e9,
        "torch_times_s": torch_times,
        "ort_times_s": ort_times,
    }


@dataclass(frozen=True)
class _Plan:
    """What to time: sizes, batches, repeats, the exporter, threads and a progress callback."""

    sizes: Sequence[int]
    batches: Sequence[int]
    repeats: int
    warmup: int
    exporter: str
    threads: int
    say: Callable[[str], None]


def _arch_rows(
    arch: str, model: Any, plan: _Plan, rng: np.random.Generator, tmp: Path
) -> list[dict[str, Any]]:
    """One architecture exported once, then timed at every size and batch."""
    import torch

    from qcloop.deploy.onnx.convert import to_onnx

    divisor = int(getattr(model, "divisor", 1))
    params = sum(p.numel() for p in model.parameters())
    size0 = plan.sizes[0]
    example = torch.from_numpy(rng.standard_normal((1, 1, size0, size0)).astype(np.float32))
    plan.say(f"{arch}: exporting to ONNX ({params / 1e6:.2f} M parameters)...")
    proto = to_onnx(model, example, "image", "logits", divisor, None, plan.exporter)
    path = tmp / f"{arch}.onnx"
    path.write_bytes(proto.SerializeToString())
    session = _ort_session(path, plan.threads)
    rows = []
    for size in plan.sizes:
        for batch in plan.batches:
            x_np = rng.standard_normal((batch, 1, size, size)).astype(np.float32)
            plan.say(f"{arch} {size} px batch {batch}: PyTorch eager and ONNX Runtime...")
            timed = _timed_row(model, session, x_np, plan.repeats, plan.warmup)
            rows.append({"arch": arch, "size": size, "batch": batch, "parameters": params, **timed})
    return rows


def _judge(rows: list[dict[str, Any]], sgemm: float) -> None:
    """Add each row's fractions of the sgemm rate and its PASS/MISS against :data:`TARGETS`."""
    for row in rows:
        row["torch_sgemm_fraction"] = row["torch_gflops"] / sgemm
        row["ort_sgemm_fraction"] = row["ort_gflops"] / sgemm
        target = _target_ratio(row["batch"])
        row["ratio_target"] = target
        row["ratio_status"] = (
            None if target is None else ("PASS" if row["ratio"] >= target else "MISS")
        )
        row["gflops_status"] = (
            "PASS" if row["ort_sgemm_fraction"] >= TARGETS["sgemm_fraction"] else "MISS"
        )


def _machine() -> dict[str, Any]:
    """The CPU, its usable cores and the platform."""
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        affinity = os.cpu_count() or 0
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "platform": platform.platform(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
    }


_NOTES = [
    "median of the timed calls after warm-up; slices/s = batch / median call time",
    "PyTorch and ONNX Runtime calls alternate, so both see the same background load",
    "ratio = PyTorch eager time / ONNX Runtime time (same input, same threads)",
    "GFLOP counted by torch FlopCounterMode (convs and matmuls, 2 per multiply-add)",
    "sgemm reference: the higher of the two torch.matmul measurements of the run",
    "ONNX Runtime: CPUExecutionProvider, all graph optimisations, intra-op threads = torch threads",
]


def run_inference_benchmark(
    *,
    sizes: Sequence[int] = (128, 256),
    batches: Sequence[int] = (1, 16),
    archs: Sequence[str] = ("bn1", "bn2"),
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    sgemm_size: int = 2048,
    exporter: str = "dynamo",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time PyTorch eager and ONNX Runtime (CPU) on each (architecture, size, batch).

    Returns JSON-able figures: ``rows`` (one per combination), ``sgemm_gflops`` (measured before
    and after), ``targets`` with PASS/MISS, and the machine (CPU, load average, threads,
    versions).
    """
    import torch

    from qcloop.deploy.onnx.manifest import library_versions

    say = progress or (lambda line: log.info("%s", line))
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    if threads is not None:
        torch.set_num_threads(int(threads))
    n_threads = torch.get_num_threads()
    models = _build_models(archs, sizes, seed)
    plan = _Plan(sizes, batches, repeats, warmup, exporter, n_threads, say)
    load_before = os.getloadavg()
    say(f"sgemm reference ({sgemm_size}^2 fp32, {n_threads} threads)...")
    sgemm_before = sgemm_gflops(sgemm_size)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="qcloop-bench-") as tmp:
        for arch, model in models.items():
            rows += _arch_rows(arch, model, plan, rng, Path(tmp))
    elapsed = time.perf_counter() - started
    say("sgemm reference again...")
    sgemm_after = sgemm_gflops(sgemm_size)
    load_after = os.getloadavg()
    sgemm = max(sgemm_before, sgemm_after)
    _judge(rows, sgemm)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "threads": n_threads,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "versions": {**library_versions(), "numpy": np.__version__},
        "settings": {
            "sizes": list(sizes),
            "batches": list(batches),
            "archs": list(archs),
            "repeats": repeats,
            "warmup": warmup,
            "exporter": exporter,
            "sgemm_size": sgemm_size,
        },
        "sgemm_gflops": {"before": sgemm_before, "after": sgemm_after, "reference": sgemm},
        "targets": dict(TARGETS),
        "rows": rows,
        "elapsed_s": elapsed,
        "notes": list(_NOTES),
    }
