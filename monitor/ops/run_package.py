"""What a registered model version is, whatever registry holds it: its name, the specs that
select it, the files of one view's model set, their digests and manifest, and its lineage tags.

A version of ``PREFIX-<VIEW>`` is a small run folder holding that view's model set::

    config.yaml  run.json  qcloop-model.json (sha256 of every file, and the set's digest)
    <VIEW>/candidates.json  <VIEW>/candidates/*.pt  <VIEW>/qc.pt  <VIEW>/fences.json
    <VIEW>/pose.json

A backend stages it with :func:`stage`, stores it, and checks a copy it hands back with
:func:`verify`; consumers get a local run folder, so everything that loads a run folder loads a
registered version. The errors of the registry contract are defined here as well.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qcloop.monitor.core.atomic import sha256_file

__all__ = [
    "MANIFEST",
    "NAME_PATTERN",
    "TAG_DIGEST",
    "TAG_KIND",
    "TAG_RUN_DIR",
    "TAG_VIEW",
    "VIEWS",
    "ModelSpec",
    "RegistryError",
    "RegistryUnavailableError",
    "check_registration",
    "check_run",
    "model_files",
    "package_tags",
    "parse_spec",
    "prefix_of",
    "read_run_info",
    "recorded_folder",
    "registered_name",
    "run_digest",
    "run_views",
    "spec_names",
    "stage",
    "verify",
    "view_of",
]

#: The views a model set can have (as in ``qcloop.monitor.method.run_folder``, not imported: torch).
VIEWS = ("SA", "LA")
#: The manifest written into every staged version.
MANIFEST = "qcloop-model.json"

TAG_VIEW = "qcloop.view"
TAG_DIGEST = "qcloop.digest"
TAG_KIND = "qcloop.kind"
TAG_RUN_DIR = "qcloop.run_dir"

#: A registered-model name prefix (also ``registry.name_prefix`` in the configuration).
NAME_PATTERN = r"[A-Za-z0-9_.-]+"
_VIEW_NAME = re.compile(rf"({NAME_PATTERN})-(SA|LA)")


class RegistryError(ValueError):
    """A run folder, spec, model, version or alias the model registry cannot use (the message
    names it)."""


class RegistryUnavailableError(RuntimeError):
    """The registry's store cannot be reached or refused a call (the message names the store)."""


# --------------------------------------------------------------------------- names and specs


def registered_name(prefix: str, view: str) -> str:
    """``PREFIX-<VIEW>``."""
    return f"{prefix}-{view}"


def view_of(name: str, version: str, tags: Mapping[str, str] | None = None) -> str:
    """The view of ``version`` of model ``name``: its ``qcloop.view`` tag, else the name's
    ``-SA``/``-LA`` suffix."""
    tags = dict(tags or {})
    if tags.get(TAG_VIEW) in VIEWS:
        return str(tags[TAG_VIEW])
    m = _VIEW_NAME.fullmatch(name)
    if m:
        return m.group(2)
    raise RegistryError(
        f"model {name!r} version {version}: no {TAG_VIEW} tag and no -SA/-LA suffix"
    )


def prefix_of(name: str) -> str | None:
    """``PREFIX`` of a model named ``PREFIX-SA``/``PREFIX-LA``; None for any other name."""
    m = _VIEW_NAME.fullmatch(name)
    return m.group(1) if m else None


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``base`` (a prefix or one model's name) and an alias or a version."""

    text: str
    base: str
    alias: str | None
    version: str | None

    @property
    def single(self) -> bool:
        """Whether ``base`` names one model (``PREFIX-SA``) rather than a prefix."""
        return _VIEW_NAME.fullmatch(self.base) is not None


def parse_spec(spec: str) -> ModelSpec:
    """``PREFIX@ALIAS`` (every view), ``PREFIX-SA@ALIAS`` or ``PREFIX-SA/3``; a leading
    ``models:/`` is accepted."""
    text = spec.strip()
    if text.startswith("models:/"):
        text = text[len("models:/") :]
    m = re.fullmatch(rf"({NAME_PATTERN})@([A-Za-z0-9_-]+)", text)
    if m:
        return ModelSpec(spec, m.group(1), m.group(2), None)
    m = re.fullmatch(rf"({NAME_PATTERN})/(\d+)", text)
    if m:
        parsed = ModelSpec(spec, m.group(1), None, m.group(2))
        if not parsed.single:
            raise RegistryError(
                f"model spec {spec!r}: a version needs one model's name (PREFIX-SA/3 or PREFIX-LA/3)"
            )
        return parsed
    raise RegistryError(
        f"model spec {spec!r}: expected PREFIX@ALIAS (every view), PREFIX-SA@ALIAS or PREFIX-SA/3"
    )


def spec_names(spec: ModelSpec) -> list[str]:
    """The registered models a spec can select: one, or ``PREFIX-<VIEW>`` for every view."""
    return [spec.base] if spec.single else [registered_name(spec.base, v) for v in VIEWS]


# --------------------------------------------------------------------------- run folders


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run folder."""
    path = run_dir / "run.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{path}: missing - {run_dir} is not a qcloop run folder") from None
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(info, dict):
        raise RegistryError(f"{path}: not a JSON object")
    return info


def run_views(run_dir: Path) -> list[str]:
    """The views a run folder holds a trained model set of."""
    return [v for v in VIEWS if (run_dir / v / "candidates.json").exists()]


def check_run(run_dir: Path) -> dict[str, Any]:
    """Check that ``run_dir`` is a run folder with a valid configuration; return its
    ``run.json``."""
    from qcloop.monitor.core.config import ConfigError, load_config

    if not run_dir.is_dir():
        raise RegistryError(f"{run_dir}: not a folder (expected a qcloop run folder)")
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise RegistryError(f"{config}: missing - {run_dir} is not a qcloop run folder")
    try:
        load_config(config)
    except (ConfigError, ValueError) as exc:
        raise RegistryError(f"{config}: invalid run configuration ({exc})") from exc
    return read_run_info(run_dir)


def check_registration(
    run_dir: Path, name_prefix: str, views: Sequence[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Check everything a registration needs before anything is stored; return the run's
    ``run.json`` and the views to register (default: every trained view)."""
    info = check_run(run_dir)
    chosen = list(views or run_views(run_dir))
    if not chosen:
        raise RegistryError(f"{run_dir}: holds no trained view (no <VIEW>/candidates.json)")
    for view in chosen:
        if view not in VIEWS:
            raise RegistryError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)}")
    if not re.fullmatch(NAME_PATTERN, name_prefix):
        raise RegistryError(f"name prefix {name_prefix!r}: use letters, digits, '_', '.', '-'")
    for view in chosen:  # every file present before anything is stored
        model_files(run_dir, view)
    return info, chosen


def model_files(run_dir: Path, view: str) -> list[str]:
    """Relative paths of what makes one view's model set (``run.json`` excluded)."""
    manifest = run_dir / view / "candidates.json"
    if not manifest.exists():
        raise RegistryError(f"{manifest}: missing - {run_dir} has no trained {view} model set")
    try:
        entries = json.loads(manifest.read_text())
        rel = [f for e in entries for f in _entry_files(run_dir, view, e)]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise RegistryError(f"{manifest}: unreadable candidate list ({exc})") from exc
    if not rel:
        raise RegistryError(f"{manifest}: lists no candidates")
    files = ["config.yaml", f"{view}/candidates.json", *rel, f"{view}/qc.pt"]
    for optional in ("fences.json", "pose.json"):
        if (run_dir / view / optional).exists():
            files.append(f"{view}/{optional}")
    for f in files:
        if not (run_dir / f).is_file():
            raise RegistryError(f"{run_dir / f}: missing file of the {view} model set")
    return files


def _entry_files(run_dir: Path, view: str, entry: Mapping[str, Any]) -> list[str]:
    """Relative paths of one candidate: its weights, or (a calibrated model qcloop did not
    train) its card and the model file or folder the card names."""
    if "card" not in entry:
        return [f"{view}/{entry['path']}"]
    card = posixpath.normpath(f"{view}/{entry['card']}")
    if card.startswith(("../", "/")):
        raise ValueError(f"candidate card {entry['card']!r} lies outside the run folder")
    model = (run_dir / card).parent / str(yaml.safe_load((run_dir / card).read_text())["path"])
    if model.is_dir():
        return [
            card,
            *(p.relative_to(run_dir).as_posix() for p in sorted(model.rglob("*")) if p.is_file()),
        ]
    return [card, model.relative_to(run_dir).as_posix()]


def _file_digests(run_dir: Path, view: str) -> dict[str, str]:
    return {f: sha256_file(run_dir / f) for f in model_files(run_dir, view)}


def _combine(digests: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(digests):
        h.update(f"{rel}\0{digests[rel]}\n".encode())
    return h.hexdigest()


def run_digest(run_dir: str | Path, view: str) -> str:
    """Content digest of one view's model set in a run folder (configuration included)."""
    return _combine(_file_digests(Path(run_dir), view))


def stage(run_dir: Path, view: str, dst: Path) -> str:
    """Copy one view's model set, ``run.json`` and a manifest into ``dst``; return the digest."""
    digests = _file_digests(run_dir, view)
    for rel in [*digests, "run.json"]:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run_dir / rel, target)
    digest = _combine(digests)
    manifest = {"view": view, "digest": digest, "files": digests}
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return digest


def verify(folder: Path, view: str, digest: str | None) -> None:
    """Check a copy of a version against its manifest (and the registered digest)."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files: dict[str, str] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"{path}: missing or unreadable model manifest ({exc})") from exc
    for rel, expected in files.items():
        f = folder / rel
        if not f.is_file() or sha256_file(f) != expected:
            raise RegistryError(f"{f}: missing or differs from the registered model's manifest")
    if manifest.get("view") != view or (digest and _combine(files) != digest):
        raise RegistryError(f"{path}: does not describe the registered {view} version")


def recorded_folder(tags: Mapping[str, str], view: str) -> Path | None:
    """The run folder a version was registered from (tag ``qcloop.run_dir``) when it still
    holds exactly the version's files; else None."""
    local = tags.get(TAG_RUN_DIR)
    if not local or not Path(local).is_dir():
        return None
    try:
        same = run_digest(local, view) == tags.get(TAG_DIGEST)
    except RegistryError:
        return None
    return Path(local) if same else None


# --------------------------------------------------------------------------- lineage


def package_tags(run_dir: Path, info: Mapping[str, Any], view: str, digest: str) -> dict[str, str]:
    """The tags every version carries: view, digest, kind, source folder, and the lineage
    ``run.json`` records (training data, data window, its OoD counts, refiner)."""
    tags = {
        TAG_VIEW: view,
        TAG_DIGEST: digest,
        TAG_KIND: str(info.get("kind", "")),
        TAG_RUN_DIR: str(run_dir.resolve()),
        "qcloop.created": str(info.get("created", "")),
        "qcloop.qcloop_version": str(info.get("qcloop_version", "")),
    }
    if info.get("data"):
        tags["qcloop.training_data"] = str(info["data"])
    view_info = dict((info.get("views") or {}).get(view) or {})
    if info.get("refined_on"):
        tags["qcloop.data_window"] = str(info["refined_on"])
    for key, tag in (("cases", "qcloop.window_cases"), ("flagged", "qcloop.window_ood")):
        if isinstance(view_info.get(key), int):
            tags[tag] = str(view_info[key])
    if view_info.get("refiner"):
        tags["qcloop.refiner"] = str(view_info["refiner"])
    return tags
