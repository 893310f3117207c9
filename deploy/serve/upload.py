"""Checking an uploaded NIfTI file before its voxel data is decompressed.

``qcloop serve`` never trusts an upload: the file type comes from its bytes (never from the
client's file name or content type), and the header's dimensions, data type and spacing are
checked against the service's limits from the first bytes of the file, so a 20000 x 20000 header
or a gzip bomb is refused before any voxel is read. The view and phase may come from the client's
file name (``..._SA_ED.nii.gz``) but the name is never used as a path.
"""

from __future__ import annotations

import gzip
import io
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = [
    "GZIP_MAGIC",
    "UploadLimits",
    "UploadProblem",
    "UploadSummary",
    "inspect_upload",
    "names_from_filename",
    "store_upload",
]

GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_SIZE = 348
_NIFTI2_SIZE = 540
#: Tokens of a file name that name a view; anything else is ignored.
_VIEW_TOKENS = {"SA": "SA", "SAX": "SA", "LA": "LA", "LAX": "LA"}
_PHASE_TOKENS = {"ED", "ES"}


class UploadProblem(Exception):
    """An upload the service refuses: ``status`` is the HTTP status, ``reason`` says why."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = int(status)
        self.reason = reason
        super().__init__(f"{status}: {reason}")


@dataclass(frozen=True)
class UploadLimits:
    """What ``qcloop serve`` accepts (the ``serving`` section of the configuration)."""

    max_inplane: int
    max_slices: int
    #: in-plane spacing (mm) the model resamples to; bounds the resampled grid too. None: none.
    target_spacing_mm: float | None = None


@dataclass(frozen=True)
class UploadSummary:
    """What the header of an accepted upload says."""

    compressed: bool
    nifti_version: int
    shape: tuple[int, ...]
    dtype: str
    zooms_mm: tuple[float, float, float]

    @property
    def suffix(self) -> str:
        """File name suffix the upload is stored under (chosen by the server)."""
        return ".nii.gz" if self.compressed else ".nii"


def names_from_filename(filename: str | None) -> tuple[str | None, str | None]:
    """(view, phase) named by the tokens of a client's file name, ``None`` where it does not tell.

    ``001_SA_ED.nii.gz`` gives ``("SA", "ED")``. A name that names both views gives no view.
    """
    if not filename:
        return None, None
    base = re.split(r"[\\/]", filename)[-1]
    base = re.sub(r"(\.nii)?(\.gz)?$", "", base, flags=re.IGNORECASE)
    tokens = [t.upper() for t in re.split(r"[^A-Za-z0-9]+", base) if t]
    views = {_VIEW_TOKENS[t] for t in tokens if t in _VIEW_TOKENS}
    phases = [t for t in tokens if t in _PHASE_TOKENS]
    view = views.pop() if len(views) == 1 else None
    phase = phases[0] if len(set(phases)) == 1 else None
    return view, phase


def _read_head(fileobj: BinaryIO, compressed: bool, size: int) -> bytes:
    """The first ``size`` bytes of the (decompressed) file; only those are decompressed."""
    fileobj.seek(0)
    if not compressed:
        return fileobj.read(size)
    try:
        with gzip.GzipFile(fileobj=fileobj, mode="rb") as stream:
            return stream.read(size)
    except (OSError, EOFError, zlib.error) as exc:
        raise UploadProblem(
            422, f"truncated or corrupt gzip stream: the NIfTI header cannot be read ({exc})"
        ) from exc


def _header_class(head: bytes) -> tuple[type, int]:
    """The nibabel header class of a single-file NIfTI header, from sizeof_hdr and magic."""
    import nibabel as nib

    if len(head) >= 4:
        for order in ("<", ">"):
            size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
            if size == _NIFTI1_SIZE and len(head) >= _NIFTI1_SIZE:
                magic = head[344:348]
                if magic == b"n+1\x00":
                    return nib.Nifti1Header, 1
                if magic == b"ni1\x00":
                    raise UploadProblem(
                        415, "a NIfTI-1 header of a .hdr/.img pair: upload a single-file .nii"
                    )
            if size == _NIFTI2_SIZE and len(head) >= _NIFTI2_SIZE and head[4:8] == b"n+2\x00":
                return nib.Nifti2Header, 2
    raise UploadProblem(415, "not a NIfTI file (no NIfTI-1/NIfTI-2 single-file header found)")


def inspect_upload(fileobj: BinaryIO, limits: UploadLimits) -> UploadSummary:
    """Check an upload's type and header against ``limits`` without reading its voxel data.

    Accepted: a single-file NIfTI-1 or NIfTI-2 image, gzipped or not, 3D (or 4D with one frame),
    real numeric voxels, positive finite spacing, in-plane size and slice count within the
    limits, and an in-plane grid that stays within ``max_inplane`` once resampled to the
    model's spacing.

    Raises:
        UploadProblem: 415 for a file that is not NIfTI, 413 for dimensions over the limits, 422
            for a header that is unreadable or describes an image the service cannot segment.
    """
    fileobj.seek(0)
    start = fileobj.read(2)
    compressed = start == GZIP_MAGIC
    head = _read_head(fileobj, compressed, _NIFTI2_SIZE)
    header_class, version = _header_class(head)
    try:
        header = header_class.from_fileobj(io.BytesIO(head), check=True)
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
    except Exception as exc:  # nibabel raises several types for an inconsistent header
        raise UploadProblem(422, f"unreadable NIfTI header ({type(exc).__name__}: {exc})") from exc
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise UploadProblem(
            422,
            f"wrong dimensionality: {len(shape)}D image of shape {shape}; expected a 3D volume "
            "(X, Y, Z) or a single-frame 4D one (a single slice is stored with Z = 1)",
        )
    if min(shape) < 1:
        raise UploadProblem(422, f"empty image: shape {shape}")
    x, y, z = shape[:3]
    if max(x, y) > limits.max_inplane:
        raise UploadProblem(
            413,
            f"image of {x} x {y} voxels in-plane exceeds the limit of {limits.max_inplane} "
            "(serving.max_inplane)",
        )
    if z > limits.max_slices:
        raise UploadProblem(
            413,
            f"image of {z} slices exceeds the limit of {limits.max_slices} (serving.max_slices)",
        )
    if dtype.kind not in "uif" or dtype.fields is not None:
        raise UploadProblem(422, f"voxel data type {dtype} is not a real number type")
    pixdim = [float(v) for v in np.asarray(header["pixdim"], dtype=np.float64)[1:4]]
    if not all(np.isfinite(v) and v > 0 for v in pixdim):
        raise UploadProblem(
            422, f"zero, negative or non-finite voxel spacing {tuple(pixdim)} in the header"
        )
    unit = header.get_xyzt_units()[0]
    scale = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}.get(unit, 1.0)
    zooms = (pixdim[0] * scale, pixdim[1] * scale, pixdim[2] * scale)
    target = limits.target_spacing_mm
    if target:
        resampled = [round(n * s / target) for n, s in zip((x, y), zooms[:2], strict=True)]
        if max(resampled) > limits.max_inplane:
            raise UploadProblem(
                413,
                f"field of view of {x * zooms[0]:.0f} x {y * zooms[1]:.0f} mm resamples to "
                f"{resampled[0]} x {resampled[1]} voxels at the model's {target:g} mm, over the "
                f"limit of {limits.max_inplane} (serving.max_inplane); check the spacing",
            )
        if min(resampled) < 1:
            raise UploadProblem(
                422,
                f"field of view of {x * zooms[0]:.3g} x {y * zooms[1]:.3g} mm is smaller than "
                f"one voxel at the model's {target:g} mm; check the spacing",
            )
    return UploadSummary(
        compressed=compressed,
        nifti_version=version,
        shape=shape,
        dtype=str(dtype),
        zooms_mm=zooms,
    )


def store_upload(fileobj: BinaryIO, folder: Path, summary: UploadSummary) -> Path:
    """Copy an accepted upload into ``folder`` under a server-chosen name; returns the path."""
    import shutil

    path = folder / f"upload{summary.suffix}"
    fileobj.seek(0)
    with open(path, "xb") as out:
        shutil.copyfileobj(fileobj, out, 1 << 20)
    return path
