"""Speed and agreement of :func:`qcloop.monitor.method.segmentation_metrics.compute_metrics` against MONAI's
``compute_hausdorff_distance`` and a whole-image scipy distance-transform version, on heart-like
label maps (nested ellipses for LV and MYO, a crescent for the RV) and perturbed predictions.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from qcloop.monitor import STRUCTURES
from qcloop.monitor.method.segmentation_metrics import compute_metrics

__all__ = ["heart_label_map", "run_metrics_benchmark"]

logger = logging.getLogger(__name__)

_NAMES: tuple[str, ...] = ("LV", "MYO", "RV")


def heart_label_map(
    shape: tuple[int, int],
    spacing: tuple[float, float],
    rng: np.random.Generator,
    *,
    scale: float = 1.0,
    jitter: float = 0.0,
) -> np.ndarray:
    """One short-axis slice: LV blood pool, myocardial ring and RV crescent (labels 1, 2, 3).

    Args:
        shape: slice size in pixels.
        spacing: pixel size in mm.
        rng: source of the smooth boundary irregularities.
        scale: size of the heart relative to a mid-ventricular slice (smaller towards the apex).
        jitter: relative amount of perturbation (centre shift, radii, wobbly contours); 0 gives
            a clean reference, about 0.1 a plausible prediction.
    """
    rows, cols = np.indices(shape, dtype=np.float64)
    y_mm = (rows - shape[0] / 2) * spacing[0]
    x_mm = (cols - shape[1] / 2) * spacing[1]
    shift = rng.normal(0.0, 3.0 * jitter, size=2)  # mm
    cy, cx = 4.0 + shift[0], 6.0 + shift[1]

    def blob(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        dy, dx = y_mm - cy, x_mm - cx
        angle = np.arctan2(dy, dx)
        wobble = 1.0 + sum(
            rng.normal(0.0, 0.04 * jitter) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
            for k in (2, 3, 5)
        )
        size = 1.0 + rng.normal(0.0, 0.5 * jitter)
        return (dy / (ry * size)) ** 2 + (dx / (rx * size)) ** 2 <= wobble**2

    endo = blob(cy, cx, 22.0 * scale, 19.0 * scale)
    epi = blob(cy, cx, 31.0 * scale, 28.0 * scale) | endo
    rv_outer = blob(cy - 4.0 * scale, cx - 30.0 * scale, 38.0 * scale, 30.0 * scale)
    rv_cut = blob(cy, cx, 36.0 * scale, 33.0 * scale)
    label = np.zeros(shape, dtype=np.uint8)
    label[rv_outer & ~rv_cut & ~epi] = STRUCTURES["RV"]
    label[epi] = STRUCTURES["MYO"]
    label[endo] = STRUCTURES["LV"]
    if jitter > 0 and rng.random() < 0.5:  # a small false-positive island, as segmenters make
        island = blob(cy + 55.0, cx + 45.0, 2.0, 2.0)
        label[island & (label == 0)] = STRUCTURES["RV"]
    return label


def _heart_stack(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    jitter: float,
) -> np.ndarray:
    """A short-axis stack (X, Y, Z): the heart shrinks from base to apex along Z."""
    scales = np.linspace(1.1, 0.45, shape[2])
    slices = [
        heart_label_map(shape[:2], spacing[:2], rng, scale=float(s), jitter=jitter) for s in scales
    ]
    return np.stack(slices, axis=-1)


def _pairs(
    kind: str, shape: tuple[int, ...], spacing: tuple[float, ...], n_pairs: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_pairs):
        if kind == "2d":
            ref = heart_label_map(shape, spacing, rng, jitter=0.0)  # type: ignore[arg-type]
            pred = heart_label_map(shape, spacing, rng, jitter=0.12)  # type: ignore[arg-type]
        else:
            ref = _heart_stack(shape, spacing, rng, jitter=0.0)  # type: ignore[arg-type]
            pred = _heart_stack(shape, spacing, rng, jitter=0.12)  # type: ignore[arg-type]
        pairs.append((pred, ref))
    return pairs


def _scipy_whole_image(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]
) -> dict[str, tuple[float, float, float]]:
    """Dice, HD, HD95 per structure with distance transforms over the whole image (baseline)."""
    out = {}
    for name in _NAMES:
        p = pred == STRUCTURES[name]
        r = ref == STRUCTURES[name]
        dice = 2.0 * np.count_nonzero(p & r) / (np.count_nonzero(p) + np.count_nonzero(r))
        pe = ndimage.binary_erosion(p) ^ p
        re = ndimage.binary_erosion(r) ^ r
        d_pr = ndimage.distance_transform_edt(~re, sampling=spacing)[pe]
        d_rp = ndimage.distance_transform_edt(~pe, sampling=spacing)[re]
        hd = max(d_pr.max(), d_rp.max())
        hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
        out[name] = (float(dice), float(hd), float(hd95))
    return out


def _monai_runner(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> Callable:
    """A call computing MONAI's HD and HD95 of LV, MYO, RV from prepared one-hot tensors."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    def one_hot(label: np.ndarray) -> torch.Tensor:
        channels = np.stack([label == k for k in range(4)])[None].astype(np.float32)
        return torch.from_numpy(channels)

    y_pred, y = one_hot(pred), one_hot(ref)

    def run() -> tuple[np.ndarray, np.ndarray]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            hd = compute_hausdorff_distance(y_pred, y, spacing=list(spacing))
            hd95 = compute_hausdorff_distance(y_pred, y, percentile=95, spacing=list(spacing))
        return hd[0].numpy(), hd95[0].numpy()

    return run


def _time_ms(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def _max_diff(a: list[float], b: list[float]) -> float:
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]
    return max(diffs) if diffs else 0.0


def _bench_kind(
    kind: str,
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    repeats: int,
    seed: int,
    n_pairs: int,
) -> dict[str, Any]:
    pairs = _pairs(kind, shape, spacing, n_pairs, seed)
    times: dict[str, list[float]] = {"qcloop": [], "monai": [], "scipy_whole_image": []}
    ours_hd: list[float] = []
    ours_hd95: list[float] = []
    monai_hd: list[float] = []
    monai_hd95: list[float] = []
    full_hd: list[float] = []
    full_hd95: list[float] = []
    for pred, ref in pairs:
        monai_run = _monai_runner(pred, ref, spacing)
        ours = compute_metrics(pred, ref, spacing)
        hd, hd95 = monai_run()
        full = _scipy_whole_image(pred, ref, spacing)
        for i, name in enumerate(_NAMES):
            if ours[name].penalised:
                continue
            ours_hd.append(ours[name].hd)
            ours_hd95.append(ours[name].hd95)
            monai_hd.append(float(hd[i]))
            monai_hd95.append(float(hd95[i]))
            full_hd.append(full[name][1])
            full_hd95.append(full[name][2])
        for _ in range(repeats):  # interleaved, so a load spike hits all three alike
            times["qcloop"].append(_time_ms(lambda p=pred, r=ref: compute_metrics(p, r, spacing)))
            times["monai"].append(_time_ms(monai_run))
            times["scipy_whole_image"].append(
                _time_ms(lambda p=pred, r=ref: _scipy_whole_image(p, r, spacing))
            )
    median = {key: statistics.median(values) for key, values in times.items()}
    return {
        "shape": list(shape),
        "spacing_mm": list(spacing),
        "pairs": n_pairs,
        "calls_per_method": n_pairs * repeats,
        "median_ms": median,
        "speedup_vs_monai": median["monai"] / median["qcloop"],
        "speedup_vs_scipy_whole_image": median["scipy_whole_image"] / median["qcloop"],
        "max_abs_diff_mm": {
            "qcloop_vs_monai_hd": _max_diff(ours_hd, monai_hd),
            "qcloop_vs_monai_hd95": _max_diff(ours_hd95, monai_hd95),
            "scipy_whole_image_vs_monai_hd": _max_diff(full_hd, monai_hd),
            "scipy_whole_image_vs_monai_hd95": _max_diff(full_hd95, monai_hd95),
        },
        "compared_values": len(ours_hd),
    }


def run_metrics_benchmark(repeats: int = 20, seed: int = 0) -> dict[str, Any]:
    """Time qcloop's metrics, MONAI's HD/HD95 and a whole-image scipy version, and compare values.

    Args:
        repeats: timed calls per method and mask pair (4 slice pairs, 2 stack pairs).
        seed: seed of the phantom generator.

    Returns:
        JSON-able figures: per kind ("2d": 256x256 slice, "3d": 256x256x10 stack), median ms per
        mask pair for each method, speed-ups, and the largest value differences against MONAI.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    kinds = {
        "2d": ((256, 256), (1.4, 1.4)),
        "3d": ((256, 256, 10), (1.4, 1.4, 10.0)),
    }
    # Fewer 3D stacks than 2D slices: MONAI takes seconds per stack on a loaded machine.
    n_pairs = {"2d": 4, "3d": 2}
    results = {
        kind: _bench_kind(kind, shape, spacing, repeats, seed, n_pairs=n_pairs[kind])
        for kind, (shape, spacing) in kinds.items()
    }
    return {
        "benchmark": "metrics",
        "repeats": repeats,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(load, 2) if math.isfinite(load) else None,
        "results": results,
        "notes": [
            "qcloop: Dice + HD + HD95 for LV, MYO, RV in one compute_metrics call (float32 values).",
            "monai: compute_hausdorff_distance twice (percentile None and 95), LV/MYO/RV channels "
            "of prepared one-hot tensors (one-hot conversion not timed); no Dice.",
            "scipy_whole_image: Dice + HD + HD95 with erosion and distance transforms over the "
            "whole image, float64 percentiles (hence differences of float32 rounding size).",
            "wall-clock medians on a shared machine that may be loaded; compare within one run. "
            "MONAI's torch path slows sharply under CPU contention: see torch_threads.",
        ],
    }
