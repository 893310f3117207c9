"""Local copies of registered versions: downloaded once per store, model and version into a
cache folder, and checked against the version's manifest before use."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qcloop.monitor.ops.run_package import MANIFEST, TAG_DIGEST, RegistryError, verify, view_of

log = logging.getLogger(__name__)

__all__ = ["CACHE_ENV", "default_cache_dir", "download_version"]

CACHE_ENV = "QCLOOP_MODEL_CACHE"


def default_cache_dir() -> Path:
    """Where downloaded versions are kept: ``QCLOOP_MODEL_CACHE``, else the user cache."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qcloop" / "models"


def download_version(client: Any, uri: str, cache_dir: Path, name: str, mv: Any) -> Path:
    """A verified local copy of model version ``mv`` of ``name`` (an MLflow ``ModelVersion``
    whose source is ``runs:/<run id>/qcloop-<VIEW>``), under
    ``cache_dir/<store hash>/<name>/<version>``; a cached copy that does not verify is
    downloaded again."""
    tags = {str(k): str(v) for k, v in dict(mv.tags or {}).items()}
    view = view_of(name, str(mv.version), tags)
    digest = tags.get(TAG_DIGEST)
    root = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:12] / name
    final = root / str(mv.version)
    if (final / MANIFEST).exists():
        try:
            verify(final, view, digest)
            return final
        except RegistryError:
            log.warning("%s: cached copy does not verify; downloading again", final)
            shutil.rmtree(final, ignore_errors=True)
    source = str(mv.source)
    m = re.fullmatch(r"runs:/([^/]+)/(.+)", source)
    if not m:
        raise RegistryError(
            f"model {name!r} version {mv.version}: source {source!r} is not a qcloop "
            "registration (expected runs:/<run id>/qcloop-<VIEW>)"
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mv.version}.tmp.", dir=root))
    try:
        got = Path(client.download_artifacts(m.group(1), m.group(2), str(tmp)))
        verify(got, view, digest)
        try:
            os.replace(got, final)
        except OSError:
            if not (final / MANIFEST).exists():  # not a concurrent download of this version
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
