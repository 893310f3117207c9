"""Folders written whole or not at all: staged beside their target, then swapped into place.

An ONNX export and a Triton model repository are many files that only make sense together.
Each is written into a private staging folder next to its target, and moved over the target
only once everything passed its checks; a failure leaves the target as it was and no staging
folder behind.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["is_replaceable", "replace_folder", "staged_folder"]


def is_replaceable(out: Path, marker: str) -> bool:
    """Whether ``out`` may be replaced: absent, an empty folder, or a folder holding ``marker``
    (the file an earlier write of the same kind left there)."""
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    return not any(out.iterdir()) or (out / marker).exists()


def replace_folder(staging: Path, out: Path) -> None:
    """Move the staged folder to ``out``, replacing a previous folder there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
        try:
            staging.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A staging folder beside ``out``; when the block ends without an error it becomes ``out``
    (an ordinary, world-readable folder), else it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private
        replace_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
