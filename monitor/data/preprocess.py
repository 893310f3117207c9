"""Preprocessing a case for a 2D network, and the exact way back to the original grid.

Forward (``Preprocessor.prepare``): per-volume intensity normalisation, in-plane resampling to a
target spacing (linear for the image; labels as one-hot maps resampled linearly then argmax),
then a centred crop/pad of every slice to ``size x size``. The slice axis is never resampled.

Forward for probability maps (``PreprocessTransform.apply_probabilities``): ``(X, Y, Z, C)`` maps
on the original grid (another model's output) are resampled linearly per channel and windowed
like the image, ``(Z, C, H, W)``; the window beyond the image is background.

Back (``PreprocessTransform``): network outputs ``(Z, C, H, W)`` are placed back into the
resampled grid (regions the crop cut away become background), resampled linearly to the original
in-plane grid and returned as ``(X, Y, Z, C)``; labels go through one-hot probabilities and argmax.

Labels use one-hot linear resampling rather than nearest neighbour: nearest snaps every boundary to
the closest sample (shifts of up to half a voxel, thin structures broken or thickened), while
argmax over linearly interpolated one-hot maps places each boundary where the two classes' partial
volumes cross, at sub-voxel accuracy.

Resampling is separable linear interpolation (bilinear in-plane, vectorised over slices and
channels) and keeps the centre of the field of view fixed: output voxel ``o`` of an axis of ``n_out``
voxels at spacing ``t`` samples input coordinate ``(o - (n_out - 1) / 2) * t / s + (n_in - 1) / 2``
of an axis of ``n_in`` voxels at spacing ``s``, with ``n_out = round(n_in * s / t)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from qcloop.monitor.data.case import Case

__all__ = ["Prepared", "PreprocessTransform", "Preprocessor"]

Normalisation = Literal["zscore", "percentile", "minmax", "none"]
NORMALISATIONS: tuple[str, ...] = ("zscore", "percentile", "minmax", "none")
#: Intensity percentiles that ``"percentile"`` normalisation maps to 0 and 1.
PERCENTILES = (0.5, 99.5)
_NUM_LABELS = 4


@dataclass(frozen=True)
class PreprocessTransform:
    """What ``Preprocessor.prepare`` did to one case, and its inverse.

    Attributes:
        original_shape: the case's ``(X, Y, Z)``.
        original_spacing: the case's voxel size in mm.
        resampled_shape: in-plane ``(X, Y)`` after resampling (equal to the original when not
            resampled).
        resampled_spacing: in-plane spacing in mm after resampling.
        offset: prepared index ``p`` along X / Y is resampled index ``p + offset``.
        output_shape: in-plane shape ``(H, W)`` given to the network.
    """

    original_shape: tuple[int, int, int]
    original_spacing: tuple[float, float, float]
    resampled_shape: tuple[int, int]
    resampled_spacing: tuple[float, float]
    offset: tuple[int, int]
    output_shape: tuple[int, int]

    @property
    def resampled(self) -> bool:
        """Whether the in-plane grid was resampled."""
        return self.resampled_shape != self.original_shape[:2] or any(
            not np.isclose(a, b, rtol=1e-6, atol=0.0)
            for a, b in zip(self.resampled_spacing, self.original_spacing[:2], strict=True)
        )

    def apply_image(self, image: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Map an ``(X, Y, Z)`` float volume on the original grid to ``(Z, H, W)`` float32 slices."""
        slices = np.ascontiguousarray(np.moveaxis(self._check_xyz(image), 2, 0), np.float32)
        if self.resampled:
            slices = self._resample(slices, forward=True)
        return _window(slices, self.offset, self.output_shape, fill)

    def apply_labels(self, labels: np.ndarray) -> np.ndarray:
        """Map ``(X, Y, Z)`` labels on the original grid to ``(Z, H, W)`` uint8 slices."""
        labels = np.moveaxis(self._check_xyz(labels), 2, 0)
        if self.resampled:
            probs = self._resample(_one_hot(labels, axis=1), forward=True)
            labels = np.argmax(probs, axis=1)
        return _window(labels.astype(np.uint8), self.offset, self.output_shape, 0)

    def apply_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """Map probabilities ``(X, Y, Z, C)`` on the original grid to ``(Z, C, H, W)`` float32
        on this transform's grid (the counterpart of :meth:`restore_probabilities`); the window
        beyond the image is background (class 0 probability 1)."""
        probs = np.asarray(probabilities, dtype=np.float32)
        if probs.ndim != 4 or probs.shape[:3] != self.original_shape:
            raise ValueError(
                f"probabilities of shape {probs.shape}; expected (*{self.original_shape}, C)"
            )
        if not np.all(np.isfinite(probs)):
            raise ValueError("probabilities contain NaN/Inf")
        slices = np.ascontiguousarray(np.transpose(probs, (2, 3, 0, 1)))
        if self.resampled:
            slices = self._resample(slices, forward=True)
        out = np.zeros((*slices.shape[:2], *self.output_shape), dtype=np.float32)
        out[:, 0] = 1.0
        (sx, dx), (sy, dy) = (
            _axis_slices(slices.shape[-2 + a], self.output_shape[a], self.offset[a])
            for a in range(2)
        )
        out[..., dx, dy] = slices[..., sx, sy]
        return out

    def restore_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """Map network probabilities ``(Z, C, H, W)`` to ``(X, Y, Z, C)`` float32 on the original
        grid; voxels outside the network's window are background (class 0 probability 1)."""
        probs = np.asarray(probabilities, dtype=np.float32)
        z = self.original_shape[2]
        if probs.ndim != 4 or probs.shape[0] != z or probs.shape[2:] != self.output_shape:
            raise ValueError(
                f"probabilities of shape {probs.shape}; expected (Z={z}, C, "
                f"{self.output_shape[0]}, {self.output_shape[1]})"
            )
        if not np.all(np.isfinite(probs)):
            raise ValueError("probabilities contain NaN/Inf")
        out = np.zeros((z, probs.shape[1], *self.resampled_shape), dtype=np.float32)
        out[:, 0] = 1.0
        _unwindow_into(out, probs, self.offset)
        if self.resampled:
            out = self._resample(out, forward=False)
        return np.ascontiguousarray(np.transpose(out, (2, 3, 0, 1)))

    def restore_labels(self, labels: np.ndarray) -> np.ndarray:
        """Map network labels ``(Z, H, W)`` to uint8 ``(X, Y, Z)`` on the original grid (through
        one-hot probabilities and argmax when resampled); outside the window is background."""
        labels = np.asarray(labels)
        z = self.original_shape[2]
        if labels.shape != (z, *self.output_shape):
            raise ValueError(f"labels of shape {labels.shape}; expected {(z, *self.output_shape)}")
        if not self.resampled:
            out = np.zeros((z, *self.resampled_shape), dtype=np.uint8)
            _unwindow_into(out, labels.astype(np.uint8), self.offset)
            return np.ascontiguousarray(np.moveaxis(out, 0, 2))
        probs = self.restore_probabilities(_one_hot(labels, axis=1))
        return np.argmax(probs, axis=3).astype(np.uint8)

    def _check_xyz(self, volume: np.ndarray) -> np.ndarray:
        volume = np.asarray(volume)
        if volume.shape != self.original_shape:
            raise ValueError(f"volume of shape {volume.shape}; expected {self.original_shape}")
        return volume

    def _resample(self, volume: np.ndarray, *, forward: bool) -> np.ndarray:
        """Resample the last two axes of ``volume`` between the original and resampled grids."""
        dst_shape = self.resampled_shape if forward else self.original_shape[:2]
        src_spacing = self.original_spacing[:2] if forward else self.resampled_spacing
        dst_spacing = self.resampled_spacing if forward else self.original_spacing[:2]
        out = np.asarray(volume, dtype=np.float32)
        for axis in range(2):
            out = _resample_axis(
                out,
                axis=out.ndim - 2 + axis,
                size=dst_shape[axis],
                step=dst_spacing[axis] / src_spacing[axis],
            )
        return out


@dataclass(eq=False)
class Prepared:
    """A case ready for a 2D network.

    Attributes:
        key: the case's ``"subject/view/phase"``.
        image: float32 ``(Z, H, W)`` normalised slices (H along the case's X, W along Y).
        gt: uint8 ``(Z, H, W)`` labels, or ``None``.
        spacing: voxel size in mm of the prepared slices (in-plane X, Y, then the original Z).
        transform: the record of what was done, with its inverse.
    """

    key: str
    image: np.ndarray
    gt: np.ndarray | None
    spacing: tuple[float, float, float]
    transform: PreprocessTransform


class Preprocessor:
    """Normalise, resample in-plane and crop/pad cases to the network's input size.

    Args:
        size: in-plane output size (square); a multiple of ``divisor``. ``None`` keeps the
            resampled grid and pads each in-plane axis to the next multiple of ``divisor``.
        target_spacing: in-plane spacing in mm to resample to; ``None`` keeps the case's spacing.
        divisor: the network's total stride; output sizes are multiples of it.
        normalisation: ``"zscore"`` (zero mean, unit variance per volume; a constant volume
            becomes 0), ``"percentile"`` (intensities clipped to the ``percentiles`` of the
            volume, mapped to 0-1; a constant volume becomes 0), ``"minmax"`` (the volume's
            minimum to 0 and maximum to 1; a constant volume becomes 0) or ``"none"`` (the
            intensities as they are).
        percentiles: for ``"percentile"``: the low and high percentiles (0-100) mapped to 0
            and 1.

    Padding around the image takes the minimum of the normalised volume (air, not mid-grey).
    """

    def __init__(
        self,
        size: int | None,
        target_spacing: float | None = None,
        divisor: int = 1,
        normalisation: Normalisation = "zscore",
        percentiles: tuple[float, float] = PERCENTILES,
    ) -> None:
        if divisor < 1:
            raise ValueError(f"divisor must be >= 1, got {divisor}")
        if size is not None and (size < 1 or size % divisor):
            raise ValueError(f"size must be a positive multiple of divisor {divisor}, got {size}")
        if target_spacing is not None and not (np.isfinite(target_spacing) and target_spacing > 0):
            raise ValueError(
                f"target_spacing must be a positive number of mm, got {target_spacing}"
            )
        if normalisation not in NORMALISATIONS:
            raise ValueError(
                f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}"
            )
        lo, hi = (float(p) for p in percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
        self.size = size
        self.target_spacing = target_spacing
        self.divisor = divisor
        self.normalisation = normalisation
        self.percentiles = (lo, hi)

    def __repr__(self) -> str:
        extra = "" if self.percentiles == PERCENTILES else f", percentiles={self.percentiles}"
        return (
            f"Preprocessor(size={self.size}, target_spacing={self.target_spacing}, "
            f"divisor={self.divisor}, normalisation={self.normalisation!r}{extra})"
        )

    def transform_for(
        self, shape: tuple[int, int, int], spacing: tuple[float, float, float]
    ) -> PreprocessTransform:
        """The transform this preprocessor applies to a volume of ``shape`` and ``spacing``."""
        x, y, z = (int(n) for n in shape)
        sx, sy, sz = (float(s) for s in spacing)
        if self.target_spacing is None:
            resampled_spacing = (sx, sy)
            resampled_shape = (x, y)
        else:
            t = float(self.target_spacing)
            resampled_spacing = (t, t)
            resampled_shape = (max(1, round(x * sx / t)), max(1, round(y * sy / t)))
        if self.size is None:
            output_shape = tuple(-(-n // self.divisor) * self.divisor for n in resampled_shape)
        else:
            output_shape = (self.size, self.size)
        offset = tuple(
            (n - s) // 2 if n >= s else -((s - n) // 2)
            for n, s in zip(resampled_shape, output_shape, strict=True)
        )
        return PreprocessTransform(
            original_shape=(x, y, z),
            original_spacing=(sx, sy, sz),
            resampled_shape=resampled_shape,
            resampled_spacing=resampled_spacing,
            offset=(int(offset[0]), int(offset[1])),
            output_shape=(int(output_shape[0]), int(output_shape[1])),
        )

    def prepare(self, case: Case) -> Prepared:
        """The case's normalised, resampled, cropped/padded slices, and the transform's record."""
        slices, transform = self.prepare_image(case.image, case.spacing)
        gt = None if case.gt is None else transform.apply_labels(case.gt)
        spacing = (*transform.resampled_spacing, transform.original_spacing[2])
        return Prepared(key=case.key, image=slices, gt=gt, spacing=spacing, transform=transform)

    def prepare_image(
        self, image: np.ndarray, spacing: tuple[float, float, float]
    ) -> tuple[np.ndarray, PreprocessTransform]:
        """An ``(X, Y, Z)`` volume's normalised, resampled, cropped/padded ``(Z, H, W)`` float32
        slices (the image part of :meth:`prepare`), and the transform's record."""
        transform = self.transform_for(np.shape(image), spacing)
        normalised = self.normalise(image)
        fill = float(normalised.min()) if normalised.size else 0.0
        return transform.apply_image(normalised, fill=fill), transform

    def normalise(self, image: np.ndarray) -> np.ndarray:
        """The volume's intensities normalised as configured, float32, always finite."""
        values = np.asarray(image, dtype=np.float64)
        if values.size == 0:
            return values.astype(np.float32)
        if self.normalisation == "zscore":
            mean = float(values.mean())
            std = float(values.std())
            if std > 1e-8 * max(1.0, abs(mean)):
                out = (values - mean) / std
            else:  # constant up to rounding: nothing to scale
                out = np.zeros_like(values)
        elif self.normalisation == "percentile":
            lo, hi = (float(v) for v in np.percentile(values, self.percentiles))
            out = _scaled(np.clip(values, lo, hi), lo, hi)
        elif self.normalisation == "minmax":
            out = _scaled(values, float(values.min()), float(values.max()))
        else:
            out = values
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def _scaled(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``values`` with ``lo`` mapped to 0 and ``hi`` to 1; zeros when ``hi`` is ``lo`` (up to
    rounding)."""
    if hi - lo > 1e-8 * max(1.0, abs(hi)):
        return (values - lo) / (hi - lo)
    return np.zeros_like(values)


def _one_hot(labels: np.ndarray, axis: int) -> np.ndarray:
    labels = np.asarray(labels)
    num = max(_NUM_LABELS, int(labels.max()) + 1 if labels.size else _NUM_LABELS)
    classes = np.arange(num, dtype=labels.dtype).reshape((-1,) + (1,) * (labels.ndim - axis))
    return (np.expand_dims(labels, axis) == classes).astype(np.float32)


def _resample_axis(volume: np.ndarray, axis: int, size: int, step: float) -> np.ndarray:
    """Linear interpolation along one axis onto ``size`` centre-aligned samples ``step`` input
    voxels apart; positions beyond the edges take the edge value."""
    n = volume.shape[axis]
    if n == 1:
        return np.repeat(volume, size, axis=axis)
    coords = (np.arange(size) - (size - 1) / 2) * step + (n - 1) / 2
    coords = np.clip(coords, 0.0, n - 1.0)
    low = np.minimum(np.floor(coords).astype(np.intp), n - 2)
    weight = (coords - low).astype(np.float32).reshape((-1,) + (1,) * (volume.ndim - axis - 1))
    below = np.take(volume, low, axis=axis)
    above = np.take(volume, low + 1, axis=axis)
    return below + (above - below) * weight


def _axis_slices(n: int, s: int, offset: int) -> tuple[slice, slice]:
    """(source slice in the resampled axis of n, destination slice in the window of s)."""
    start, stop = max(offset, 0), min(offset + s, n)
    return slice(start, stop), slice(start - offset, stop - offset)


def _window(
    volume: np.ndarray, offset: tuple[int, int], out_shape: tuple[int, int], fill: float
) -> np.ndarray:
    out = np.full(volume.shape[:-2] + tuple(out_shape), fill, dtype=volume.dtype)
    (sx, dx), (sy, dy) = (
        _axis_slices(volume.shape[-2 + a], out_shape[a], offset[a]) for a in range(2)
    )
    out[..., dx, dy] = volume[..., sx, sy]
    return out


def _unwindow_into(out: np.ndarray, window: np.ndarray, offset: tuple[int, int]) -> None:
    (sx, dx), (sy, dy) = (
        _axis_slices(out.shape[-2 + a], window.shape[-2 + a], offset[a]) for a in range(2)
    )
    out[..., sx, sy] = window[..., dx, dy]
