"""Checking a NIfTI file from its first bytes, before any voxel data is decompressed.

Shared by ``qcloop serve`` (uploads) and ``qcloop monitor`` (inbox files): the file type comes
from its bytes (never from a name or a content type), and the header's dimensions, data type
and spacing are checked against the configured limits, so a 20000 x 20000 header or a gzip
bomb is refused having read a few hundred bytes.
"""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

__all__ = ["GZIP_MAGIC", "HeaderLimits", "HeaderProblem", "HeaderSummary", "inspect_header"]

GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_SIZE = 348
_NIFTI2_SIZE = 540


class HeaderProblem(Exception):
    """A NIfTI file refused from its header: ``status`` is the HTTP status a service answers
    with (415 not NIfTI, 413 over the limits, 422 unreadable or unusable), ``reason`` says why."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = int(status)
        self.reason = reason
        super().__init__(f"{status}: {reason}")


@dataclass(frozen=True)
class HeaderLimits:
    """What ``qcloop serve`` and ``qcloop monitor`` accept (the ``serving`` section of the
    configuration)."""

    max_inplane: int
    max_slices: int
    #: in-plane spacing (mm) the model resamples to; bounds the resampled grid too. None: none.
    target_spacing_mm: float | None = None


@dataclass(frozen=True)
class HeaderSummary:
    """What the header of an accepted file says."""

    compressed: bool
    nifti_version: int
    shape: tuple[int, ...]
    dtype: str
    zooms_mm: tuple[float, float, float]

    @property
    def suffix(self) -> str:
        """File name suffix the upload is stored under (chosen by the server that stores it)."""
        return ".nii.gz" if self.compressed else ".nii"


def _read_head(fileobj: BinaryIO, compressed: bool, size: int) -> bytes:
    """The first ``size`` bytes of the (decompressed) file; only those are decompressed."""
    fileobj.seek(0)
    if not compressed:
        return fileobj.read(size)
    try:
        with gzip.GzipFile(fileobj=fileobj, mode="rb") as stream:
            return stream.read(size)
    except (OSError, EOFError, zlib.error) as exc:
        raise HeaderProblem(
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
                    raise HeaderProblem(
                        415, "a NIfTI-1 header of a .hdr/.img pair: upload a single-file .nii"
                    )
            if size == _NIFTI2_SIZE and len(head) >= _NIFTI2_SIZE and head[4:8] == b"n+2\x00":
                return nib.Nifti2Header, 2
    raise HeaderProblem(415, "not a NIfTI file (no NIfTI-1/NIfTI-2 single-file header found)")


def inspect_header(fileobj: BinaryIO, limits: HeaderLimits) -> HeaderSummary:
    """Check a file's type and header against ``limits`` without reading its voxel data.

    Accepted: a single-file NIfTI-1 or NIfTI-2 image, gzipped or not, 3D (or 4D with one frame),
    real numeric voxels, positive finite spacing, in-plane size and slice count within the
    limits, and an in-plane grid that stays within ``max_inplane`` once resampled to the
    model's spacing.

    Raises:
        HeaderProblem: 415 for a file that is not NIfTI, 413 for dimensions over the limits, 422
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
        raise HeaderProblem(422, f"unreadable NIfTI header ({type(exc).__name__}: {exc})") from exc
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise HeaderProblem(
            422,
            f"wrong dimensionality: {len(shape)}D image of shape {shape}; expected a 3D volume "
            "(X, Y, Z) or a single-frame 4D one (a single slice is stored with Z = 1)",
        )
    if min(shape) < 1:
        raise HeaderProblem(422, f"empty image: shape {shape}")
    x, y, z = shape[:3]
    if max(x, y) > limits.max_inplane:
        raise HeaderProblem(
            413,
            f"image of {x} x {y} voxels in-plane exceeds the limit of {limits.max_inplane} "
            "(serving.max_inplane)",
        )
    if z > limits.max_slices:
        raise HeaderProblem(
            413,
            f"image of {z} slices exceeds the limit of {limits.max_slices} (serving.max_slices)",
        )
    if dtype.kind not in "uif" or dtype.fields is not None:
        raise HeaderProblem(422, f"voxel data type {dtype} is not a real number type")
    pixdim = [float(v) for v in np.asarray(header["pixdim"], dtype=np.float64)[1:4]]
    if not all(np.isfinite(v) and v > 0 for v in pixdim):
        raise HeaderProblem(
            422, f"zero, negative or non-finite voxel spacing {tuple(pixdim)} in the header"
        )
    unit = header.get_xyzt_units()[0]
    scale = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}.get(unit, 1.0)
    zooms = (pixdim[0] * scale, pixdim[1] * scale, pixdim[2] * scale)
    target = limits.target_spacing_mm
    if target:
        resampled = [round(n * s / target) for n, s in zip((x, y), zooms[:2], strict=True)]
        if max(resampled) > limits.max_inplane:
            raise HeaderProblem(
                413,
                f"field of view of {x * zooms[0]:.0f} x {y * zooms[1]:.0f} mm resamples to "
                f"{resampled[0]} x {resampled[1]} voxels at the model's {target:g} mm, over the "
                f"limit of {limits.max_inplane} (serving.max_inplane); check the spacing",
            )
        if min(resampled) < 1:
            raise HeaderProblem(
                422,
                f"field of view of {x * zooms[0]:.3g} x {y * zooms[1]:.3g} mm is smaller than "
                f"one voxel at the model's {target:g} mm; check the spacing",
            )
    return HeaderSummary(
        compressed=compressed,
        nifti_version=version,
        shape=shape,
        dtype=str(dtype),
        zooms_mm=zooms,
    )
