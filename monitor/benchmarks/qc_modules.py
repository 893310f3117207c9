"""``qcloop bench qc-modules``: the per-case reconstruction cost of every registered QC module,
against the paper's mask autoencoder, measured in one run (timings interleaved, so that machine
noise falls on every module alike). Untrained weights: the cost of a forward pass does not
depend on what the network learnt."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from qcloop.monitor.method.qc_call import call_reconstruct, needs_image

#: The module every ratio is taken against.
BASELINE = "autoencoder"


def run_qc_module_benchmark(
    *,
    names: Sequence[str] | None = None,
    size: int = 128,
    slices: int = 12,
    repeats: int = 10,
    width_scale: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Median milliseconds to reconstruct one case of ``slices`` slices of ``size`` px (with
    its image, for a module that reads it) per QC module, and each module's ratio to
    :data:`BASELINE`."""
    import torch

    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    registry = get_plugin_manager().qc_modules()
    names = list(names or registry.names())
    modules = {
        n: registry.create(n, {"input_size": size, "width_scale": width_scale}) for n in names
    }
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, (slices, size, size))
    probs = np.eye(4, dtype=np.float32)[labels].transpose(0, 3, 1, 2).copy()
    image = rng.standard_normal((slices, size, size)).astype(np.float32)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up: first calls allocate
            call_reconstruct(modules[n], probs, image)
        for _ in range(repeats):
            for n in names:
                t0 = time.perf_counter()
                call_reconstruct(modules[n], probs, image)
                times[n].append((time.perf_counter() - t0) * 1000)
    median = {n: statistics.median(v) for n, v in times.items()}
    base = median.get(BASELINE)
    return {
        "size": size, "slices": slices, "repeats": repeats, "width_scale": width_scale,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "median_ms_per_case": median,
        "needs_image": {n: needs_image(m) for n, m in modules.items()},
        "ratio_to_autoencoder": {n: (v / base if base else None) for n, v in median.items()},
    }  # fmt: skip


def qc_module_table(figures: dict[str, Any]) -> str:
    """The figures as a small text table."""
    lines = [
        f"QC modules: {figures['slices']} slices of {figures['size']} px per case, width_scale "
        f"{figures['width_scale']}, {figures['repeats']} repeats, torch threads "
        f"{figures['torch_threads']}, cpus {figures['cpu_count']}",
        "",
        f"{'module':<22}{'image':>7}{'ms/case':>10}{'x autoencoder':>15}",
    ]
    for name, ms in figures["median_ms_per_case"].items():
        ratio = figures["ratio_to_autoencoder"][name]
        shown = "-" if ratio is None else f"{ratio:.2f}"
        image = "yes" if figures["needs_image"][name] else "no"
        lines.append(f"{name:<22}{image:>7}{ms:>10.1f}{shown:>15}")
    return "\n".join(lines)
