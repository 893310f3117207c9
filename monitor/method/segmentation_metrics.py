"""Segmentation metrics per structure: Dice, Hausdorff distance (HD) and its 95th percentile
(HD95), in mm, with finite, documented values for empty masks.

Distances follow MONAI's ``compute_hausdorff_distance`` (euclidean, symmetric): the edge of a
mask is the set of its voxels that a binary erosion with the face-connected structuring element
(outside the image counts as background) removes; the directed distances run from every edge
voxel of one mask to the nearest edge voxel of the other, scaled by the spacing; HD is the
largest of them; for HD95 the 95th percentile (linear interpolation) of each directed set is
taken and the larger of the two is kept. Distances are rounded to float32 and the percentile is
interpolated in float32 as MONAI does (via ``torch.quantile``), so the values agree with MONAI's
to the last bit whenever both masks are non-empty.

Empty masks never give inf or NaN:

- both empty: Dice 1, HD 0, HD95 0;
- exactly one empty: Dice 0 and HD = HD95 = a finite penalty, by default the diagonal of the
  field of view in mm (see :func:`fov_diagonal_mm`); :attr:`StructureScores.penalised` says so,
  so that threshold code can leave those values out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from qcloop.monitor import STRUCTURES

__all__ = [
    "DEFAULT_STRUCTURES",
    "StructureScores",
    "compute_metrics",
    "dice_score",
    "fov_diagonal_mm",
    "hausdorff",
]

logger = logging.getLogger(__name__)

#: Default structures scored by :func:`compute_metrics`, in label order.
DEFAULT_STRUCTURES: tuple[str, ...] = ("LV", "MYO", "RV")


@dataclass(frozen=True)
class StructureScores:
    """Agreement between a predicted and a reference mask of one structure.

    Attributes:
        dice: Dice coefficient in [0, 1].
        hd: symmetric Hausdorff distance (maximum), in mm (voxels with ``voxel_units=True``).
        hd95: symmetric 95th-percentile Hausdorff distance, same unit as ``hd``.
        penalised: True when exactly one of the two masks is empty; ``hd`` and ``hd95`` then hold
            the penalty rather than a measured distance.
    """

    dice: float
    hd: float
    hd95: float
    penalised: bool


def fov_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the field of view, ``norm(shape * spacing)``: the default HD penalty."""
    if len(shape) != len(spacing):
        raise ValueError(
            f"spacing has {len(spacing)} values but the shape {tuple(shape)} has {len(shape)} axes"
        )
    return float(
        math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing, strict=True)))
    )


def dice_score(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """Dice coefficient of two binary masks (non-zero is foreground); 1.0 when both are empty."""
    pred = np.asarray(pred_mask).astype(bool, copy=False)
    ref = np.asarray(ref_mask).astype(bool, copy=False)
    _check_shapes(pred.shape, ref.shape)
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    if n_pred + n_ref == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / (n_pred + n_ref)


def hausdorff(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: Sequence[float],
    percentile: float = 100.0,
    penalty: float | None = None,
) -> float:
    """Symmetric Hausdorff distance between two binary masks, in the unit of ``spacing``.

    Args:
        pred_mask: predicted binary mask, 2D or 3D (non-zero is foreground).
        ref_mask: reference binary mask of the same shape.
        spacing: voxel size along each axis (mm); pass ones for voxel units.
        percentile: 100 for the maximum (HD), 95 for HD95; any value in (0, 100].
        penalty: value returned when exactly one mask is empty; by default the field-of-view
            diagonal. Both masks empty give 0.0.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    pred = np.asarray(pred_mask).astype(bool, copy=False)
    ref = np.asarray(ref_mask).astype(bool, copy=False)
    _check_shapes(pred.shape, ref.shape)
    sampling = _check_spacing(spacing, pred.ndim)
    box = _bounding_box(pred | ref)
    if box is None:
        return 0.0
    if not pred[box].any() or not ref[box].any():
        return _penalty_value(penalty, pred.shape, sampling)
    pred_pad = _padded(pred[box])
    ref_pad = _padded(ref[box])
    d_pred, d_ref = _edge_distances(pred_pad, ref_pad, sampling)
    return float(max(_percentile_f32(d_pred, percentile), _percentile_f32(d_ref, percentile)))


def compute_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    structures: Sequence[str] = DEFAULT_STRUCTURES,
    voxel_units: bool = False,
    penalty: float | None = None,
) -> dict[str, StructureScores]:
    """Dice, HD and HD95 of each structure between a predicted and a reference label map.

    Args:
        pred: predicted label map (0 background, 1 LV, 2 MYO, 3 RV), 2D (H, W) or 3D (X, Y, Z).
        ref: reference label map of the same shape.
        spacing: voxel size in mm along each axis of the label maps; required unless
            ``voxel_units`` is set.
        structures: names from :data:`qcloop.monitor.STRUCTURES` to score.
        voxel_units: report distances in voxels (spacing treated as all ones).
        penalty: HD and HD95 of a structure present in exactly one map; by default the
            field-of-view diagonal (mm, or voxels with ``voxel_units``). Must be finite.

    Returns:
        Structure name -> :class:`StructureScores`, in the order of ``structures``.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    _check_shapes(pred.shape, ref.shape)
    if voxel_units:
        sampling = np.ones(pred.ndim, dtype=np.float64)
    elif spacing is None:
        raise ValueError("spacing (mm per voxel) is required unless voxel_units=True")
    else:
        sampling = _check_spacing(spacing, pred.ndim)
    unknown = [name for name in structures if name not in STRUCTURES]
    if unknown:
        raise ValueError(f"unknown structure(s) {unknown}; known: {sorted(STRUCTURES)}")
    fill = _penalty_value(penalty, pred.shape, sampling)

    # Hot path, written by hand: every monitored case and every candidate model goes through it.
    # Work happens inside the bounding box of the foreground of both maps (views, no copies);
    # each structure then gets the box of its own union, padded by one background voxel, where
    # the edges and the edge-to-edge distances are exactly those of the whole image.
    scores: dict[str, StructureScores] = {}
    fg_box = _bounding_box((pred != 0) | (ref != 0))
    if fg_box is None:
        return {name: StructureScores(1.0, 0.0, 0.0, False) for name in structures}
    pred_fg = pred[fg_box]
    ref_fg = ref[fg_box]
    for name in structures:
        label = STRUCTURES[name]
        scores[name] = _structure_scores(pred_fg == label, ref_fg == label, sampling, fill)
    return scores


def _structure_scores(
    pred: np.ndarray, ref: np.ndarray, sampling: np.ndarray, penalty: float
) -> StructureScores:
    """Scores of one structure from its two binary masks (any crop holding both)."""
    box = _bounding_box(pred | ref)
    if box is None:
        return StructureScores(dice=1.0, hd=0.0, hd95=0.0, penalised=False)
    pred_pad = _padded(pred[box])
    ref_pad = _padded(ref[box])
    n_pred = int(np.count_nonzero(pred_pad))
    n_ref = int(np.count_nonzero(ref_pad))
    if n_pred == 0 or n_ref == 0:
        return StructureScores(dice=0.0, hd=penalty, hd95=penalty, penalised=True)
    dice = 2.0 * int(np.count_nonzero(pred_pad & ref_pad)) / (n_pred + n_ref)
    d_pred, d_ref = _edge_distances(pred_pad, ref_pad, sampling)
    hd = max(d_pred.max(), d_ref.max())
    hd95 = max(_percentile_f32(d_pred, 95.0), _percentile_f32(d_ref, 95.0))
    return StructureScores(dice=dice, hd=float(hd), hd95=float(hd95), penalised=False)


def _check_shapes(pred_shape: tuple[int, ...], ref_shape: tuple[int, ...]) -> None:
    if pred_shape != ref_shape:
        raise ValueError(
            f"prediction and reference must have the same shape, got {pred_shape} and {ref_shape}"
        )
    if len(pred_shape) not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got shape {pred_shape}")


def _check_spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
    sampling = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sampling.size != ndim:
        raise ValueError(
            f"spacing must have one value per axis ({ndim}), got {sampling.size}: {tuple(spacing)}"
        )
    if not (np.all(np.isfinite(sampling)) and np.all(sampling > 0)):
        raise ValueError(f"spacing values must be finite and positive, got {tuple(spacing)}")
    return sampling


def _penalty_value(penalty: float | None, shape: tuple[int, ...], sampling: np.ndarray) -> float:
    if penalty is None:
        return fov_diagonal_mm(shape, sampling.tolist())
    value = float(penalty)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"penalty must be finite and non-negative, got {penalty}")
    return value


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every true voxel of ``mask``; None if there is none."""
    # Reduce over leading axes (rows OR-ed together) and over trailing blocks: both run on
    # contiguous memory, unlike numpy's any() over a short last axis.
    box = []
    rest = np.ascontiguousarray(mask)
    for n in mask.shape:
        hits = np.flatnonzero(rest.reshape(n, -1).any(axis=1))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
        rest = rest.any(axis=0)
    return tuple(box)


def _padded(mask: np.ndarray) -> np.ndarray:
    """``mask`` surrounded by one background voxel on every side."""
    out = np.zeros(tuple(n + 2 for n in mask.shape), dtype=bool)
    out[(slice(1, -1),) * mask.ndim] = mask
    return out


def _edges(padded: np.ndarray) -> np.ndarray:
    """Edge voxels of a padded mask (those with a face neighbour in the background), unpadded."""
    ndim = padded.ndim
    inner = (slice(1, -1),) * ndim
    core = padded[inner]
    interior = core.copy()
    for axis in range(ndim):
        for lo, hi in ((None, -2), (2, None)):
            shifted = list(inner)
            shifted[axis] = slice(lo, hi)
            interior &= padded[tuple(shifted)]
    return core & ~interior


def _edge_distances(
    pred_pad: np.ndarray, ref_pad: np.ndarray, sampling: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Float32 distances from each edge voxel of one mask to the nearest edge of the other."""
    pred_edges = _edges(pred_pad)
    ref_edges = _edges(ref_pad)
    return (
        _distances_to(ref_edges, pred_edges, sampling),
        _distances_to(pred_edges, ref_edges, sampling),
    )


def _distances_to(target: np.ndarray, source: np.ndarray, sampling: np.ndarray) -> np.ndarray:
    """Distance from every true voxel of ``source`` to the nearest true voxel of ``target``."""
    nearest = ndimage.distance_transform_edt(
        ~target, sampling=sampling, return_distances=False, return_indices=True
    )
    points = np.nonzero(source)
    squared = np.zeros(points[0].size, dtype=np.float64)
    for axis, coords in enumerate(points):
        step = (nearest[axis][points] - coords) * sampling[axis]
        squared += step * step
    return np.sqrt(squared).astype(np.float32)


def _percentile_f32(values: np.ndarray, percentile: float) -> np.float32:
    """Percentile with linear interpolation, rounded as ``torch.quantile`` on float32 does.

    The rank is computed in float32 and the interpolation rounded once (a fused multiply-add),
    which is what MONAI's call to ``torch.quantile`` gives on float32 distances.
    """
    n = values.size
    if percentile >= 100.0:
        return values.max()
    rank = np.float32(percentile / 100.0) * np.float32(n - 1)
    below = int(rank)
    above = min(below + 1, n - 1) if rank > below else below
    ordered = (
        np.partition(values, (below, above)) if above != below else np.partition(values, below)
    )
    low = ordered[below]
    high = ordered[above]
    weight = np.float32(rank - np.float32(below))
    step = np.float64(np.float32(high - low))
    if weight < 0.5:
        return np.float32(np.float64(low) + np.float64(weight) * step)
    return np.float32(np.float64(high) - step * np.float64(np.float32(1.0) - weight))
