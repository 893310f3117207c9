"""Output folders on object storage or any filesystem pyarrow knows (``s3://``, ``gs://``,
``hdfs://``, ``file://``): batch outputs written where a cluster's workers and its users all
reach them, without a shared POSIX mount.

A file is written locally first (as every qcloop output is), then copied to a temporary name
beside its target and moved onto it, so a reader never sees a partial object: on object stores
the move is a server-side copy, on POSIX filesystems a rename. Needs pyarrow (the ``ray`` extra).
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from pathlib import Path

__all__ = ["ObjectStore", "is_uri", "open_store"]

_CHUNK = 1 << 22


def is_uri(target: str | os.PathLike[str]) -> bool:
    """Whether ``target`` names a filesystem by URI (``scheme://...``) rather than a local
    path."""
    return "://" in os.fspath(target)


class ObjectStore:
    """The folder at ``uri`` on its pyarrow filesystem."""

    def __init__(self, uri: str) -> None:
        from qcloop.monitor.core.optional import require

        fs = require("pyarrow.fs", "ray", "outputs on object storage (--out URI)")
        self.uri = uri.rstrip("/")
        try:
            self.fs, self.base = fs.FileSystem.from_uri(self.uri)
        except Exception as exc:  # pyarrow raises several kinds for an unusable URI
            raise ValueError(f"{uri}: not a filesystem pyarrow can open ({exc})") from exc

    def put(self, local: Path, relative: str) -> str:
        """Copy ``local`` to ``relative`` below the folder (temporary name, then move); its
        URI."""
        target = f"{self.base}/{relative}"
        parent, _, name = target.rpartition("/")
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{name}.tmp.{uuid.uuid4().hex}"
        try:
            with open(local, "rb") as src, self.fs.open_output_stream(tmp) as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
            self.fs.move(tmp, target)
        except BaseException:
            # nothing was written, or the store is gone: then there is nothing to undo
            with contextlib.suppress(Exception):
                self.fs.delete_file(tmp)
            raise
        return f"{self.uri}/{relative}"


@functools.lru_cache(maxsize=8)
def open_store(uri: str) -> ObjectStore:
    """The :class:`ObjectStore` of ``uri``, opened once per process."""
    return ObjectStore(uri)
