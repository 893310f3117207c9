"""Checking an uploaded NIfTI file before its voxel data is decompressed.

``qcloop serve`` never trusts an upload: the file type comes from its bytes (never from the
client's file name or content type), and the header's dimensions, data type and spacing are
checked against the service's limits from the first bytes of the file
(:mod:`qcloop.monitor.data.nifti_header`, shared with the monitor's inbox), so a 20000 x 20000
header or a gzip bomb is refused before any voxel is read. The view and phase may come from the
client's file name (``..._SA_ED.nii.gz``) but the name is never used as a path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import BinaryIO

from qcloop.monitor.data.nifti_header import (
    GZIP_MAGIC,
    HeaderLimits,
    HeaderProblem,
    HeaderSummary,
    inspect_header,
)

__all__ = [
    "GZIP_MAGIC",
    "UploadLimits",
    "UploadProblem",
    "UploadSummary",
    "inspect_upload",
    "names_from_filename",
    "store_upload",
]

#: An upload the service refuses: ``status`` is the HTTP status, ``reason`` says why.
UploadProblem = HeaderProblem
#: What ``qcloop serve`` accepts (the ``serving`` section of the configuration).
UploadLimits = HeaderLimits
#: What the header of an accepted upload says.
UploadSummary = HeaderSummary
#: Check an upload's type and header against the limits without reading its voxel data.
inspect_upload = inspect_header
#: Tokens of a file name that name a view; anything else is ignored.
_VIEW_TOKENS = {"SA": "SA", "SAX": "SA", "LA": "LA", "LAX": "LA"}
_PHASE_TOKENS = {"ED", "ES"}


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


def store_upload(fileobj: BinaryIO, folder: Path, summary: UploadSummary) -> Path:
    """Copy an accepted upload into ``folder`` under a server-chosen name; returns the path."""
    import shutil

    path = folder / f"upload{summary.suffix}"
    fileobj.seek(0)
    with open(path, "xb") as out:
        shutil.copyfileobj(fileobj, out, 1 << 20)
    return path
