"""Input files of ``qcloop monitor``: NIfTI names, and crash-safe moves and links inside its
output folder (a destination never exists half-written)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from qcloop.monitor.core import atomic

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_suffix(name: str) -> str | None:
    """``".nii.gz"`` or ``".nii"`` when ``name`` is a NIfTI file name, else ``None``."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def stem_of(name: str) -> str:
    """The file name without its NIfTI (or last) suffix."""
    suffix = nifti_suffix(name)
    if suffix:
        return name[: -len(suffix)]
    return Path(name).stem


def move_file(src: Path, dst: Path) -> Path:
    """Move ``src`` to ``dst`` (folders created): a rename, or across file systems an atomic
    copy then removal of ``src``. ``dst`` never exists half-written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with atomic.atomic_path(dst, suffix=nifti_suffix(dst.name) or "") as tmp:
            shutil.copyfile(src, tmp)
        src.unlink()
    return dst


def free_name(folder: Path, name: str, tag: str) -> Path:
    """``folder/name``, or ``folder/<stem>-<tag><suffix>`` when that is taken."""
    target = folder / name
    if not target.exists() and not Path(f"{target}.reason.txt").exists():
        return target
    suffix = nifti_suffix(name) or "".join(Path(name).suffixes[-1:])
    stem = name[: -len(suffix)] if suffix else name
    n = 0
    while True:
        candidate = folder / f"{stem}-{tag}{'-' + str(n) if n else ''}{suffix}"
        if not candidate.exists():
            return candidate
        n += 1


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link of ``src`` at ``dst`` (a copy where links are not possible); a ``dst``
    left by an earlier attempt is kept when it is ``src`` already, else replaced."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        if os.path.samefile(src, dst):
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
