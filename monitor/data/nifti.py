"""Reading and validating NIfTI cases, and writing label maps back on the original grid."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from qcloop.monitor.core.atomic import atomic_path
from qcloop.monitor.core.progress import progress
from qcloop.monitor.data.case import Case, CaseError, CaseSource, LoadReport

__all__ = ["iter_cases", "load_case", "load_cases", "save_label_map"]

logger = logging.getLogger(__name__)

#: Default largest difference (mm, per matrix entry) between image and ground-truth affines.
AFFINE_TOLERANCE_MM = 1e-3
_UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}


def load_case(source: CaseSource, *, affine_tolerance: float = AFFINE_TOLERANCE_MM) -> Case:
    """Load and validate one case; every problem raises a ``CaseError`` naming file and problem.

    Checks: the file opens and its voxel data decompresses; the image is 2D (stored as ``Z = 1``),
    3D, or 4D with a single frame (or the source's frame); finite intensities; positive spacing;
    ground truth of the same shape and affine (within ``affine_tolerance`` mm) whose label values
    are valid for the layout. Ground-truth labels are mapped to 0 bg, 1 LV, 2 MYO, 3 RV.
    """
    try:
        return _load_case(source, affine_tolerance)
    except CaseError as exc:
        exc.key = source.key
        raise


def _load_case(source: CaseSource, affine_tolerance: float) -> Case:
    image_nii = _open_nifti(source.image_path)
    image = _read_volume(image_nii, source.image_path, source.frame).astype(np.float32, copy=False)
    bad = int(image.size - np.count_nonzero(np.isfinite(image)))
    if bad:
        raise CaseError(source.image_path, f"{bad} NaN/Inf voxel(s) in the image")
    affine = np.asarray(image_nii.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise CaseError(source.image_path, "the affine contains NaN/Inf")
    spacing = _spacing_mm(image_nii, source.image_path)

    gt = None
    if source.gt_path is not None:
        gt_nii = _open_nifti(source.gt_path)
        raw = _read_volume(gt_nii, source.gt_path, source.frame)
        if raw.shape != image.shape:
            raise CaseError(
                source.gt_path,
                f"ground-truth shape {raw.shape} does not match image shape {image.shape} "
                f"of {source.image_path.name}",
            )
        gt_affine = np.asarray(gt_nii.affine, dtype=np.float64)
        if not np.allclose(gt_affine, affine, rtol=1e-6, atol=affine_tolerance):
            diff = float(np.nanmax(np.abs(gt_affine - affine)))
            raise CaseError(
                source.gt_path,
                f"ground-truth affine differs from the affine of {source.image_path.name} "
                f"by up to {diff:.4g} (tolerance {affine_tolerance:g} mm)",
            )
        gt = _map_labels(raw, source.label_map, source.gt_path)

    return Case(
        source=source,
        image=image,
        gt=gt,
        spacing=spacing,
        affine=affine,
        header=image_nii.header,
    )


def iter_cases(
    sources: Iterable[CaseSource], errors: list[CaseError] | None = None
) -> Iterator[Case]:
    """Yield each case that loads; a bad case is logged, appended to ``errors`` and skipped."""
    items = list(sources)
    for source in progress(items, desc="loading cases", total=len(items)):
        try:
            case = load_case(source)
        except CaseError as exc:
            logger.warning("skipping %s: %s", source.key, exc)
            if errors is not None:
                errors.append(exc)
            continue
        yield case


def load_cases(sources: Iterable[CaseSource]) -> LoadReport:
    """Load every case that can be read; the report keeps the others' errors."""
    report = LoadReport()
    report.cases.extend(iter_cases(sources, report.errors))
    if report.errors:
        logger.warning("%d case(s) skipped, %d loaded", len(report.errors), len(report.cases))
    return report


def save_label_map(path: str | os.PathLike[str], labels: np.ndarray, reference_case: Case) -> Path:
    """Write ``labels`` (X, Y, Z) as uint8 NIfTI with the reference case's affine and header.

    The header is copied with its data type set to uint8 and no intensity scaling; the file is
    written to a temporary file in the same folder, then moved into place. Returns the path.
    """
    target = Path(path)
    if not target.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{target}: a label map is written as .nii or .nii.gz")
    labels = np.asarray(labels)
    if labels.shape != reference_case.shape:
        raise ValueError(
            f"{target}: labels of shape {labels.shape} do not match the reference case "
            f"{reference_case.key} of shape {reference_case.shape}"
        )
    if labels.size and (
        not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 255
    ):
        raise ValueError(f"{target}: labels must be integers in 0..255, got {labels.dtype}")
    data = labels.astype(np.uint8)

    header = reference_case.header
    if isinstance(header, nib.Nifti2Header):
        image_class: Any = nib.Nifti2Image
        header = header.copy()
    else:
        image_class = nib.Nifti1Image
        header = nib.Nifti1Header.from_header(header)
    if int(header["dim"][0]) == 2 and data.shape[2] == 1:
        data = data[:, :, 0]
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = 0.0
    header["cal_max"] = 0.0
    nii = image_class(data, reference_case.affine, header=header)
    nii.set_data_dtype(np.uint8)

    suffix = ".nii.gz" if target.name.endswith(".gz") else ".nii"
    with atomic_path(target, suffix=suffix) as tmp:
        nib.save(nii, tmp)
    return target


def _open_nifti(path: Path) -> Any:
    if not path.is_file():
        raise CaseError(path, "file not found")
    try:
        nii = nib.load(path)
    except Exception as exc:  # nibabel raises several unrelated types for a bad file
        raise CaseError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(nii, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CaseError(path, f"not a NIfTI image ({type(nii).__name__})")
    return nii


def _read_volume(nii: Any, path: Path, frame: int | None) -> np.ndarray:
    """The (X, Y, Z) voxel array of a 2D, 3D or 4D file (one frame of a 4D file)."""
    shape = tuple(int(n) for n in nii.shape)
    ndim = len(shape)
    if ndim < 2:
        raise CaseError(path, f"wrong dimensionality: {ndim}D image of shape {shape}")
    if frame is not None:
        if ndim < 4 or any(n != 1 for n in shape[4:]):
            raise CaseError(
                path, f"wrong dimensionality: expected a 4D cine file, got shape {shape}"
            )
        if not 0 <= frame < shape[3]:
            raise CaseError(path, f"frame {frame} is out of range: the file has {shape[3]} frames")
        index: tuple[Any, ...] = (slice(None),) * 3 + (frame,) + (0,) * (ndim - 4)
    elif ndim > 3:
        if any(n != 1 for n in shape[3:]):
            raise CaseError(
                path,
                f"wrong dimensionality: {ndim}D image of shape {shape}; expected 3D "
                "(or 4D with a single frame)",
            )
        index = (slice(None),) * 3 + (0,) * (ndim - 3)
    else:
        index = (slice(None),) * ndim
    try:
        data = np.asanyarray(nii.dataobj[index])
    except Exception as exc:  # gzip/zlib/EOF/ValueError from a truncated or corrupt file
        raise CaseError(
            path, f"cannot read voxel data, truncated or corrupt file ({type(exc).__name__}: {exc})"
        ) from exc
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    if min(data.shape) == 0:
        raise CaseError(path, f"empty image of shape {shape}")
    return data


def _spacing_mm(nii: Any, path: Path) -> tuple[float, float, float]:
    """Voxel size from the header as written: nibabel silently replaces a zero pixdim by 1 and a
    negative one by its absolute value when loading, so the raw header is read again here."""
    header = nii.header
    try:
        with ImageOpener(path) as fileobj:
            raw = type(header).from_fileobj(fileobj, check=False)
    except Exception as exc:  # the header was readable a moment ago; report, do not guess
        raise CaseError(path, f"cannot re-read the header ({type(exc).__name__}: {exc})") from exc
    zooms = [float(z) for z in raw.get_zooms()[:3]]
    if len(zooms) == 2:
        z = float(raw["pixdim"][3])
        zooms.append(z if np.isfinite(z) and z > 0 else 1.0)
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise CaseError(path, f"zero, negative or non-finite voxel spacing {tuple(zooms)}")
    scale = _UNIT_TO_MM.get(header.get_xyzt_units()[0], 1.0)
    return (zooms[0] * scale, zooms[1] * scale, zooms[2] * scale)


def _map_labels(raw: np.ndarray, label_map: tuple[int, ...], path: Path) -> np.ndarray:
    allowed = len(label_map)
    allowed_text = "{" + ", ".join(str(v) for v in range(allowed)) + "}"
    if np.issubdtype(raw.dtype, np.integer) and raw.min() >= 0 and raw.max() < allowed:
        values = raw.astype(np.intp, copy=False)
    else:
        finite = np.isfinite(raw)
        if not finite.all():
            raise CaseError(path, f"label values outside {allowed_text}: NaN/Inf")
        rounded = np.rint(raw)
        bad = np.unique(raw[(rounded != raw) | (rounded < 0) | (rounded >= allowed)])
        if bad.size:
            shown = ", ".join(f"{v:g}" for v in bad[:10].tolist())
            more = f" and {bad.size - 10} more" if bad.size > 10 else ""
            raise CaseError(path, f"label values outside {allowed_text}: {shown}{more}")
        values = rounded.astype(np.intp)
    return np.asarray(label_map, dtype=np.uint8)[values]
