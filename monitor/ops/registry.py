"""Registered model versions in the MLflow registry: one registered model per view, aliases
``champion`` / ``challenger``, lineage tags, and the promotion gate.

A version of ``PREFIX-<VIEW>`` is a small run folder holding that view's model set::

    config.yaml  run.json  qcloop-model.json (sha256 of every file)
    <VIEW>/candidates.json  <VIEW>/candidates/*.pt  <VIEW>/qc.pt  <VIEW>/fences.json
    <VIEW>/pose.json

logged as the artifacts ``qcloop-<VIEW>/`` of an MLflow run in the experiment
``qcloop-registry``; the version's source is ``runs:/<run id>/qcloop-<VIEW>``. Consumers get a
local run folder back (downloaded into a cache and checked against the manifest), so everything
that loads a run folder (``load_online_scorers``, ``assess_run``) loads a registered version.

Registration is atomic from a user's view: files are logged, the version is created and READY
and its tags are set before any alias moves, so a crash leaves every alias where it was.
Promotion records the replaced version (alias ``previous-champion`` and the tag
``qcloop.previous_champion``), which :func:`rollback` follows back.

The gate (:func:`evaluate_gate`) is documented in docs/tracking.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcloop.monitor.core.atomic import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.config import QcloopConfig

log = logging.getLogger(__name__)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "GateDecision",
    "ModelRef",
    "RegistryError",
    "alias_versions",
    "default_cache_dir",
    "default_tracking_uri",
    "ensure_champion",
    "evaluate_gate",
    "get_version",
    "list_versions",
    "promote",
    "register_and_gate",
    "register_run",
    "resolve_model",
    "rollback",
    "run_digest",
]

#: The views a model set can have (as in ``qcloop.monitor.method.run_folder``, not imported: torch).
VIEWS = ("SA", "LA")
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-"
#: MLflow experiment holding the runs whose artifacts back registered versions.
REGISTRY_EXPERIMENT = "qcloop-registry"
MANIFEST = "qcloop-model.json"
CACHE_ENV = "QCLOOP_MODEL_CACHE"

TAG_VIEW = "qcloop.view"
TAG_DIGEST = "qcloop.digest"
TAG_KIND = "qcloop.kind"
TAG_RUN_DIR = "qcloop.run_dir"
TAG_PARENT_VERSION = "qcloop.parent_version"
TAG_PREVIOUS_CHAMPION = "qcloop.previous_champion"
TAG_GATE_PASSED = "qcloop.gate.passed"
TAG_GATE = "qcloop.gate"
TAG_ROLLED_BACK = "qcloop.rolled_back"

_NAME = r"[A-Za-z0-9_.-]+"
_VIEW_NAME = re.compile(rf"({_NAME})-(SA|LA)")
_READY_TIMEOUT_S = 300.0


class RegistryError(ValueError):
    """A spec, model, version or alias that does not exist, or a registry that cannot be used."""


@dataclass
class ModelRef:
    """One registered model version of one view, with a local run folder holding it."""

    name: str
    view: str
    version: str
    run_dir: Path
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        """``models:/NAME/VERSION``."""
        return f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {**asdict(self), "run_dir": str(self.run_dir)}


@dataclass
class GateDecision:
    """The promotion gate's verdict for one view, with the figures it was made on."""

    view: str
    passed: bool
    reasons: list[str]
    figures: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (figures are finite)."""
        return asdict(self)


# --------------------------------------------------------------------------- basics


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite database in the working folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return env or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def default_cache_dir() -> Path:
    """Where downloaded versions are kept: ``QCLOOP_MODEL_CACHE``, else the user cache."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qcloop" / "models"


def registered_name(prefix: str, view: str) -> str:
    """``PREFIX-<VIEW>``."""
    return f"{prefix}-{view}"


def _client(tracking_uri: str | None) -> Any:
    # run URLs printed to stdout would corrupt the CLI's --json output
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def _not_found(exc: Exception) -> bool:
    return _error_code(exc) == "RESOURCE_DOES_NOT_EXIST"


def _registered_model(client: Any, name: str) -> Any | None:
    """The registered model ``name``, or None when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise


def _model_version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if _not_found(exc) or _error_code(exc) == "INVALID_PARAMETER_VALUE":
            raise RegistryError(f"model {name!r} has no version {version!r}") from None
        raise


def _known_models(client: Any) -> str:
    try:
        names = sorted(m.name for m in client.search_registered_models(max_results=100))
    except Exception:  # a listing is a courtesy in an error message only
        return "unknown"
    return ", ".join(names) or "none"


def _view_of(name: str, mv: Any) -> str:
    tags = dict(mv.tags or {})
    if tags.get(TAG_VIEW) in VIEWS:
        return tags[TAG_VIEW]
    m = _VIEW_NAME.fullmatch(name)
    if m:
        return m.group(2)
    raise RegistryError(
        f"model {name!r} version {mv.version}: no {TAG_VIEW} tag and no -SA/-LA suffix"
    )


# --------------------------------------------------------------------------- run folders


def _read_run_info(run_dir: Path) -> dict[str, Any]:
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


def _run_views(run_dir: Path) -> list[str]:
    return [v for v in VIEWS if (run_dir / v / "candidates.json").exists()]


def _check_run(run_dir: Path) -> dict[str, Any]:
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
    return _read_run_info(run_dir)


def _model_files(run_dir: Path, view: str) -> list[str]:
    """Relative paths of what makes one view's model set (run.json excluded)."""
    manifest = run_dir / view / "candidates.json"
    if not manifest.exists():
        raise RegistryError(f"{manifest}: missing - {run_dir} has no trained {view} model set")
    try:
        entries = json.loads(manifest.read_text())
        rel = [f"{view}/{e['path']}" for e in entries]
    except (ValueError, KeyError, TypeError) as exc:
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


def _file_digests(run_dir: Path, view: str) -> dict[str, str]:
    return {f: sha256_file(run_dir / f) for f in _model_files(run_dir, view)}


def _combine(digests: dict[str, str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(digests):
        h.update(f"{rel}\0{digests[rel]}\n".encode())
    return h.hexdigest()


def run_digest(run_dir: str | Path, view: str) -> str:
    """Content digest of one view's model set in a run folder (configuration included)."""
    return _combine(_file_digests(Path(run_dir), view))


def _stage(run_dir: Path, view: str, dst: Path) -> str:
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


def _verify(folder: Path, view: str, digest: str | None) -> None:
    """Check a downloaded version against its manifest (and the registered digest)."""
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


# --------------------------------------------------------------------------- downloads


def _download(client: Any, uri: str, name: str, mv: Any, cache_dir: Path | None) -> Path:
    """A verified local copy of version ``mv`` (cached per tracking URI, name and version)."""
    view = _view_of(name, mv)
    digest = dict(mv.tags or {}).get(TAG_DIGEST)
    root = (cache_dir or default_cache_dir()) / hashlib.sha256(uri.encode()).hexdigest()[:12] / name
    final = root / str(mv.version)
    if (final / MANIFEST).exists():
        try:
            _verify(final, view, digest)
            return final
        except RegistryError:
            log.warning("%s: cached copy does not verify; downloading again", final)
            shutil.rmtree(final, ignore_errors=True)
    source = str(mv.source)
    m = re.fullmatch(r"runs:/([^/]+)/(.+)", source)
    if not m:
        raise RegistryError(
            f"model {name!r} version {mv.version}: source {source!r} is not a qcloop registration "
            "(expected runs:/<run id>/qcloop-<VIEW>)"
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mv.version}.tmp.", dir=root))
    try:
        got = Path(client.download_artifacts(m.group(1), m.group(2), str(tmp)))
        _verify(got, view, digest)
        try:
            os.replace(got, final)
        except OSError:
            if not (final / MANIFEST).exists():  # not a concurrent download of the same version
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _local_or_download(client: Any, uri: str, name: str, mv: Any, cache_dir: Path | None) -> Path:
    """The run folder recorded at registration when it still holds exactly this version's
    files, else a verified download."""
    tags = dict(mv.tags or {})
    local = tags.get(TAG_RUN_DIR)
    if local and Path(local).is_dir():
        try:
            if run_digest(local, _view_of(name, mv)) == tags.get(TAG_DIGEST):
                return Path(local)
        except RegistryError:
            pass
    return _download(client, uri, name, mv, cache_dir)


def _ref(name: str, mv: Any, run_dir: Path) -> ModelRef:
    return ModelRef(
        name=name,
        view=_view_of(name, mv),
        version=str(mv.version),
        run_dir=run_dir,
        aliases=sorted(mv.aliases or []),
        tags={str(k): str(v) for k, v in dict(mv.tags or {}).items()},
    )


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class _Spec:
    base: str
    alias: str | None
    version: str | None


def _parse_spec(spec: str) -> _Spec:
    text = spec.strip()
    if text.startswith("models:/"):
        text = text[len("models:/") :]
    m = re.fullmatch(rf"({_NAME})@([A-Za-z0-9_-]+)", text)
    if m:
        return _Spec(m.group(1), m.group(2), None)
    m = re.fullmatch(rf"({_NAME})/(\d+)", text)
    if m:
        return _Spec(m.group(1), None, m.group(2))
    raise RegistryError(
        f"model spec {spec!r}: expected PREFIX@ALIAS (every view), PREFIX-SA@ALIAS or PREFIX-SA/3"
    )


def _spec_targets(client: Any, spec: str) -> list[tuple[str, Any]]:
    """(registered model name, model version) for every view a spec selects."""
    parsed = _parse_spec(spec)
    single = _VIEW_NAME.fullmatch(parsed.base)
    if parsed.version is not None:
        if not single:
            raise RegistryError(
                f"model spec {spec!r}: a version needs one model's name (PREFIX-SA/3 or PREFIX-LA/3)"
            )
        if _registered_model(client, parsed.base) is None:
            raise RegistryError(
                f"model spec {spec!r}: no registered model {parsed.base!r} "
                f"(registered: {_known_models(client)})"
            )
        return [(parsed.base, _model_version(client, parsed.base, parsed.version))]
    names = [parsed.base] if single else [registered_name(parsed.base, v) for v in VIEWS]
    found, missing_alias = [], []
    for name in names:
        rm = _registered_model(client, name)
        if rm is None:
            continue
        version = _aliases(rm).get(parsed.alias)
        if version is None:
            missing_alias.append(
                f"{name} (aliases: {', '.join(sorted(rm.aliases or {})) or 'none'})"
            )
            continue
        found.append((name, _model_version(client, name, version)))
    if not found:
        if missing_alias:
            raise RegistryError(
                f"model spec {spec!r}: no version carries alias {parsed.alias!r} in "
                + "; ".join(missing_alias)
            )
        raise RegistryError(
            f"model spec {spec!r}: no registered model {' or '.join(repr(n) for n in names)} "
            f"(registered: {_known_models(client)})"
        )
    return found


def resolve_model(
    spec: str, *, tracking_uri: str | None = None, cache_dir: Path | None = None
) -> dict[str, ModelRef]:
    """View -> version selected by ``spec``, each with a verified local run folder (downloaded
    into ``cache_dir``, default :func:`default_cache_dir`, once per version).

    ``spec``: ``PREFIX@ALIAS`` (every view registered as ``PREFIX-<VIEW>`` with that alias),
    ``PREFIX-SA@ALIAS``, ``PREFIX-SA/3``; a leading ``models:/`` is accepted.
    """
    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    refs = {}
    for name, mv in _spec_targets(client, spec):
        ref = _ref(name, mv, _download(client, uri, name, mv, cache_dir))
        refs[ref.view] = ref
    return refs


def alias_versions(spec: str, *, tracking_uri: str | None = None) -> dict[str, str]:
    """View -> version currently selected by ``spec`` (no download: cheap enough to poll)."""
    client = _client(tracking_uri)
    return {_view_of(name, mv): str(mv.version) for name, mv in _spec_targets(client, spec)}


# --------------------------------------------------------------------------- registration


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException:  # created meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def _ensure_registered_model(client: Any, name: str, view: str) -> None:
    from mlflow.exceptions import MlflowException

    if _registered_model(client, name) is not None:
        return
    try:
        client.create_registered_model(
            name,
            tags={TAG_VIEW: view},
            description=f"qcloop {view} model sets: candidate segmenters, QC module, fences",
        )
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise


def _wait_ready(client: Any, name: str, version: str) -> Any:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        mv = client.get_model_version(name, version)
        status = str(mv.status)
        if status == "READY":
            return mv
        if status == "FAILED_REGISTRATION":
            raise RegistryError(
                f"model {name!r} version {version}: registration failed ({mv.status_message})"
            )
        if time.monotonic() > deadline:
            raise RegistryError(f"model {name!r} version {version}: not READY after 300 s")
        time.sleep(0.5)


def _versions_with_digest(client: Any, name: str, digest: str) -> list[Any]:
    found = client.search_model_versions(f"name = '{name}'")
    return sorted(
        (mv for mv in found if dict(mv.tags or {}).get(TAG_DIGEST) == digest),
        key=lambda mv: int(mv.version),
    )


def _lineage_tags(
    client: Any, run: Path, info: dict[str, Any], view: str, name: str, digest: str
) -> dict[str, str]:
    tags = {
        TAG_VIEW: view,
        TAG_DIGEST: digest,
        TAG_KIND: str(info.get("kind", "")),
        TAG_RUN_DIR: str(run.resolve()),
        "qcloop.created": str(info.get("created", "")),
        "qcloop.qcloop_version": str(info.get("qcloop_version", "")),
    }
    if info.get("data"):
        tags["qcloop.training_data"] = str(info["data"])
    view_info = dict(info.get("views", {}).get(view) or {})
    if info.get("refined_on"):
        tags["qcloop.data_window"] = str(info["refined_on"])
    for key, tag in (("cases", "qcloop.window_cases"), ("flagged", "qcloop.window_ood")):
        if isinstance(view_info.get(key), int):
            tags[tag] = str(view_info[key])
    if view_info.get("refiner"):
        tags["qcloop.refiner"] = str(view_info["refiner"])
    parent = info.get("parent")
    if parent and Path(parent).is_dir():
        try:
            parents = _versions_with_digest(client, name, run_digest(parent, view))
        except RegistryError:
            parents = []
        if parents:
            tags[TAG_PARENT_VERSION] = str(parents[-1].version)
    return tags


def register_run(
    run_dir: Path,
    *,
    name_prefix: str = "qcloop",
    tags: dict[str, str] | None = None,
    alias: str | None = CHALLENGER,
    tracking_uri: str | None = None,
    views: Sequence[str] | None = None,
    view_tags: dict[str, dict[str, str]] | None = None,
) -> dict[str, ModelRef]:
    """Register one new version per view of a run folder as ``PREFIX-<VIEW>``.

    The view's model set, ``config.yaml`` and ``run.json`` are logged as artifacts of one MLflow
    run; each version is created from them, awaited until READY and tagged with its lineage
    (digest, kind, parent version, data window and OoD counts from ``run.json``, then ``tags``
    and ``view_tags[view]``). Only then does ``alias`` move (``champion`` through
    :func:`promote`). Fires ``on_model_version_registered`` per version.
    """
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    run = Path(run_dir)
    info = _check_run(run)
    chosen = list(views or _run_views(run))
    if not chosen:
        raise RegistryError(f"{run}: holds no trained view (no <VIEW>/candidates.json)")
    for view in chosen:
        if view not in VIEWS:
            raise RegistryError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)}")
    if not re.fullmatch(_NAME, name_prefix):
        raise RegistryError(f"name prefix {name_prefix!r}: use letters, digits, '_', '.', '-'")
    for view in chosen:  # every file present before anything is logged
        _model_files(run, view)
    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    exp_id = _experiment_id(client, REGISTRY_EXPERIMENT)
    run_tags = {TAG_RUN_DIR: str(run.resolve()), "qcloop.views": ",".join(chosen)}
    mlrun = client.create_run(exp_id, run_name=f"register {run.name}", tags=run_tags)
    run_id = mlrun.info.run_id
    created: dict[str, tuple[str, Any]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="qcloop-register-") as tmp:
            digests = {}
            for view in chosen:
                staged = Path(tmp) / view
                digests[view] = _stage(run, view, staged)
                client.log_artifacts(run_id, str(staged), f"qcloop-{view}")
        for view in chosen:
            name = registered_name(name_prefix, view)
            _ensure_registered_model(client, name, view)
            vtags = _lineage_tags(client, run, info, view, name, digests[view])
            vtags.update({str(k): str(v) for k, v in (tags or {}).items()})
            vtags.update({str(k): str(v) for k, v in ((view_tags or {}).get(view) or {}).items()})
            mv = client.create_model_version(
                name,
                f"runs:/{run_id}/qcloop-{view}",
                run_id=run_id,
                tags=vtags,
                description=f"{info.get('kind', 'run')} {view} model set from {run.resolve()}",
            )
            created[view] = (name, _wait_ready(client, name, str(mv.version)))
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        with contextlib.suppress(Exception):  # never mask the original error
            client.set_terminated(run_id, "FAILED")
        raise
    pm = get_plugin_manager()
    refs = {}
    for name, mv in created.values():
        log.info("registered %s version %s", name, mv.version)
        pm.notify_model_version_registered(name, str(mv.version), dict(mv.tags or {}))
    for view, (name, mv) in created.items():  # aliases last, once every version is complete
        if alias == CHAMPION:
            promote(name, str(mv.version), alias=CHAMPION, tracking_uri=uri)
        elif alias:
            client.set_registered_model_alias(name, alias, str(mv.version))
        refs[view] = _ref(name, client.get_model_version(name, str(mv.version)), run)
    return refs


def ensure_champion(
    run_dir: Path, *, name_prefix: str = "qcloop", tracking_uri: str | None = None
) -> dict[str, ModelRef]:
    """Make sure every view of ``run_dir`` is registered (found by content digest, else
    registered) and that each model has a champion (this run's version when none); return the
    current champions. Idempotent."""
    run = Path(run_dir)
    _check_run(run)
    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    views = _run_views(run)
    if not views:
        raise RegistryError(f"{run}: holds no trained view (no <VIEW>/candidates.json)")
    found: dict[str, str] = {}
    for view in views:
        name = registered_name(name_prefix, view)
        if _registered_model(client, name) is not None:
            existing = _versions_with_digest(client, name, run_digest(run, view))
            if existing:
                found[view] = str(existing[-1].version)
    missing = [v for v in views if v not in found]
    if missing:
        refs = register_run(
            run, name_prefix=name_prefix, alias=None, tracking_uri=uri, views=missing
        )
        found.update({v: refs[v].version for v in missing})
    champions = {}
    for view in views:
        name = registered_name(name_prefix, view)
        if CHAMPION not in _aliases(client.get_registered_model(name)):
            promote(name, found[view], alias=CHAMPION, tracking_uri=uri)
        champ = client.get_model_version_by_alias(name, CHAMPION)
        champions[view] = _ref(name, champ, _local_or_download(client, uri, name, champ, None))
    return champions


# --------------------------------------------------------------------------- aliases


def promote(
    name: str, version: str, *, alias: str = CHAMPION, tracking_uri: str | None = None
) -> ModelRef:
    """Move ``alias`` to ``version``; the version it leaves gets alias ``previous-<alias>``
    and is recorded on the new one (tag ``qcloop.previous_<alias>``). A champion that was the
    challenger loses the challenger alias. Fires ``on_model_version_promoted``."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    if _registered_model(client, name) is None:
        raise RegistryError(f"no registered model {name!r} (registered: {_known_models(client)})")
    mv = _model_version(client, name, version)
    if str(mv.status) != "READY":
        raise RegistryError(f"model {name!r} version {version} is {mv.status}, not READY")
    version = str(mv.version)
    aliases = _aliases(client.get_registered_model(name))
    previous = aliases.get(alias)
    if previous != version:
        if previous is not None:
            client.set_model_version_tag(name, version, f"qcloop.previous_{alias}", previous)
            client.set_registered_model_alias(name, f"{PREVIOUS}{alias}", previous)
        client.set_registered_model_alias(name, alias, version)
        if alias == CHAMPION and aliases.get(CHALLENGER) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
        log.info("%s: %s moved to version %s (was %s)", name, alias, version, previous)
        get_plugin_manager().notify_model_version_promoted(name, version, alias, previous)
    mv = client.get_model_version(name, version)
    return _ref(name, mv, _local_or_download(client, uri, name, mv, None))


def _aliases(rm: Any) -> dict[str, str]:
    """Alias -> version of a registered model, versions as strings (MLflow 3 returns ints)."""
    return {str(k): str(v) for k, v in (rm.aliases or {}).items()}


def rollback(name: str, *, tracking_uri: str | None = None) -> ModelRef:
    """Move ``champion`` back to the version it replaced (alias ``previous-champion``); the
    one before that, if recorded, becomes ``previous-champion``. Fires
    ``on_model_version_promoted``."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    rm = _registered_model(client, name)
    if rm is None:
        raise RegistryError(f"no registered model {name!r} (registered: {_known_models(client)})")
    aliases = _aliases(rm)
    current = aliases.get(CHAMPION)
    target = aliases.get(f"{PREVIOUS}{CHAMPION}")
    if current is None:
        raise RegistryError(f"model {name!r} has no champion to roll back")
    if target is None:
        raise RegistryError(f"model {name!r}: no previous champion recorded to roll back to")
    before = dict(_model_version(client, name, target).tags or {}).get(TAG_PREVIOUS_CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, target)
    client.set_model_version_tag(
        name, current, TAG_ROLLED_BACK, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )
    if before and before != target:
        client.set_registered_model_alias(name, f"{PREVIOUS}{CHAMPION}", before)
    else:
        client.delete_registered_model_alias(name, f"{PREVIOUS}{CHAMPION}")
    log.info("%s: champion rolled back from version %s to %s", name, current, target)
    get_plugin_manager().notify_model_version_promoted(name, target, CHAMPION, current)
    mv = client.get_model_version(name, target)
    return _ref(name, mv, _local_or_download(client, uri, name, mv, None))


def list_versions(
    name_prefix: str | None = None, *, tracking_uri: str | None = None
) -> list[dict[str, Any]]:
    """Every version of the registered qcloop models (``PREFIX-<VIEW>``, or all models with a
    ``qcloop.view`` tag), newest first: name, version, aliases, status, tags, gate result."""
    client = _client(tracking_uri)
    rows = []
    for rm in client.search_registered_models(max_results=1000):
        m = _VIEW_NAME.fullmatch(rm.name)
        if name_prefix is not None and not (m and m.group(1) == name_prefix):
            continue
        if name_prefix is None and not (m or TAG_VIEW in dict(rm.tags or {})):
            continue
        # search results carry no aliases: take them from the registered model
        by_version: dict[str, list[str]] = {}
        for alias, version in _aliases(rm).items():
            by_version.setdefault(str(version), []).append(alias)
        rows.extend(
            _row(rm.name, mv, by_version.get(str(mv.version), []))
            for mv in client.search_model_versions(f"name = '{rm.name}'")
        )
    rows.sort(key=lambda r: (r["name"], -int(r["version"])))
    return rows


def _row(name: str, mv: Any, aliases: list[str] | None = None) -> dict[str, Any]:
    tags = {str(k): str(v) for k, v in dict(mv.tags or {}).items()}
    gate = None
    if TAG_GATE in tags:
        try:
            gate = json.loads(tags[TAG_GATE])
        except ValueError:
            gate = None
    return {
        "name": name,
        "version": str(mv.version),
        "aliases": sorted(aliases if aliases is not None else (mv.aliases or [])),
        "status": str(mv.status),
        "created_ms": int(mv.creation_timestamp or 0),
        "tags": tags,
        "gate": gate,
    }


def get_version(name: str, version: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """One version as :func:`list_versions` describes it."""
    client = _client(tracking_uri)
    if _registered_model(client, name) is None:
        raise RegistryError(f"no registered model {name!r} (registered: {_known_models(client)})")
    return _row(name, _model_version(client, name, version))


# --------------------------------------------------------------------------- the gate


def _as_run_dir(model: ModelRef | Path | str) -> Path:
    return model.run_dir if isinstance(model, ModelRef) else Path(model)


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return 0.0
    n = len(finite)
    return finite[n // 2] if n % 2 else 0.5 * (finite[n // 2 - 1] + finite[n // 2])


def _mean_fg_dice(labels: Any, gt: Any) -> float:
    from qcloop.monitor import STRUCTURES
    from qcloop.monitor.method.segmentation_metrics import dice_score

    return sum(dice_score(labels == v, gt == v) for v in STRUCTURES.values()) / len(STRUCTURES)


def evaluate_gate(
    challenger: ModelRef | Path,
    champion: ModelRef | Path,
    view: str,
    *,
    window_dir: Path,
    labelled_dir: Path | None,
    dice_margin: float,
) -> GateDecision:
    """Whether a challenger may replace the champion for ``view``.

    1. Drift window (every ``view`` case under ``window_dir``): both model sets score each case
       against the CHAMPION's reference fences. The challenger passes when it flags fewer cases
       OoD, or as many with a strictly higher median decision pDC (best candidate per case).
    2. Labelled validation data (the validation split of ``labelled_dir``, default the
       champion's training data from ``run.json``): the mean foreground Dice (LV, MYO, RV) of
       the QC-selected masks may not drop by more than ``dice_margin``.

    Both must pass. Cases that cannot be read are skipped and counted.
    """
    from qcloop.monitor.data import CaseError, discover, load_case
    from qcloop.monitor.method.cases import sources_for, split_labelled
    from qcloop.monitor.ops.scoring import load_online_scorers

    if not (isinstance(dice_margin, int | float) and 0.0 <= dice_margin <= 1.0):
        raise ValueError(f"dice_margin must be in [0, 1], got {dice_margin!r}")
    ch_dir, cp_dir = _as_run_dir(challenger), _as_run_dir(champion)
    for d in (ch_dir, cp_dir):
        _check_run(d)
    champ = load_online_scorers(cp_dir, [view])[view]
    chall = load_online_scorers(ch_dir, [view])[view]
    chall.fences = champ.fences  # one yardstick: the champion's reference fences
    reasons: list[str] = []
    figures: dict[str, float] = {}

    window = discover(window_dir, views=[view])
    ood = {"champion": 0, "challenger": 0}
    pdcs: dict[str, list[float]] = {"champion": [], "challenger": []}
    skipped = 0
    for src in window:
        try:
            case = load_case(src)
            results = {"champion": champ.score(case), "challenger": chall.score(case)}
        except CaseError as exc:
            log.warning("gate: %s skipped (%s)", src.image_path, exc)
            skipped += 1
            continue
        for who, r in results.items():
            ood[who] += int(r.ood)
            pdcs[who].append(float(r.scored.best()[0]))
    n_window = len(pdcs["champion"])
    figures.update(
        {
            "window_cases": float(n_window),
            "window_skipped": float(skipped),
            "champion_ood": float(ood["champion"]),
            "challenger_ood": float(ood["challenger"]),
            "champion_median_pdc": _median(pdcs["champion"]),
            "challenger_median_pdc": _median(pdcs["challenger"]),
        }
    )
    if n_window == 0:
        qc_pass = False
        reasons.append(f"no readable {view} case in the drift window {window_dir}")
    else:
        fewer = ood["challenger"] < ood["champion"]
        tie_better = (
            ood["challenger"] == ood["champion"]
            and figures["challenger_median_pdc"] > figures["champion_median_pdc"]
        )
        qc_pass = fewer or tie_better
        verdict = "passes" if qc_pass else "fails"
        reasons.append(
            f"QC on the drift window {verdict}: {ood['challenger']} vs {ood['champion']} of "
            f"{n_window} cases OoD, median pDC {figures['challenger_median_pdc']:.4f} vs "
            f"{figures['champion_median_pdc']:.4f} (challenger vs champion)"
        )

    data = labelled_dir or _read_run_info(cp_dir).get("data")
    dice_pass = False
    if not data or not Path(data).is_dir():
        reasons.append(f"no labelled validation data to check Dice on ({data or 'none recorded'})")
    else:
        from qcloop.monitor.method.run_folder import load_run_config

        cfg = load_run_config(cp_dir)
        _, val = split_labelled(sources_for(data, [view]), seed=cfg.seed)
        dice: dict[str, list[float]] = {"champion": [], "challenger": []}
        for src in val:
            try:
                case = load_case(src)
                for who, scorer in (("champion", champ), ("challenger", chall)):
                    dice[who].append(_mean_fg_dice(scorer.score(case).labels, case.gt))
            except CaseError as exc:
                log.warning("gate: validation case %s skipped (%s)", src.image_path, exc)
        n_val = min(len(dice["champion"]), len(dice["challenger"]))
        figures["val_cases"] = float(n_val)
        if n_val == 0:
            reasons.append(f"no readable labelled {view} validation case in {data}")
        else:
            cp = sum(dice["champion"][:n_val]) / n_val
            ch = sum(dice["challenger"][:n_val]) / n_val
            figures.update(
                {"champion_val_dice": cp, "challenger_val_dice": ch, "val_dice_drop": cp - ch}
            )
            dice_pass = ch >= cp - dice_margin - 1e-12
            verdict = "passes" if dice_pass else "fails"
            reasons.append(
                f"validation Dice {verdict}: {ch:.4f} vs {cp:.4f} on {n_val} case(s) "
                f"(allowed drop {dice_margin:.4f})"
            )
    figures = {k: float(v) for k, v in figures.items() if math.isfinite(float(v))}
    return GateDecision(
        view=view, passed=bool(qc_pass and dice_pass), reasons=reasons, figures=figures
    )


def register_and_gate(
    refined_run: Path,
    champions: dict[str, ModelRef],
    cfg: QcloopConfig,
    *,
    window_dir: Path,
    tags: dict[str, str],
    tracking_uri: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Register a refined run as challenger, gate it against ``champions`` per view and apply
    ``cfg.registry.promotion``: ``auto`` promotes a passing challenger, ``approve`` leaves it as
    challenger with its gate result tagged (``qcloop models promote`` decides), ``off`` only
    registers (no gate). Returns per view ``{version, gate, promoted}``."""
    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    run = Path(refined_run)
    reg = cfg.registry
    views = [v for v in _run_views(run) if v in champions]
    if not views:
        raise RegistryError(
            f"{run}: no view in common with the champions ({', '.join(sorted(champions)) or 'none'})"
        )
    view_tags = {v: {TAG_PARENT_VERSION: champions[v].version} for v in views}
    refs = register_run(
        run,
        name_prefix=reg.name_prefix,
        tags=tags,
        alias=CHALLENGER,
        tracking_uri=uri,
        views=views,
        view_tags=view_tags,
    )
    out: dict[str, dict[str, Any]] = {}
    for view in views:
        ref = refs[view]
        result: dict[str, Any] = {
            "name": ref.name,
            "version": ref.version,
            "gate": None,
            "promoted": False,
        }
        if reg.promotion != "off":
            gate = evaluate_gate(
                ref,
                champions[view],
                view,
                window_dir=Path(window_dir),
                labelled_dir=None,
                dice_margin=reg.dice_margin,
            )
            result["gate"] = gate.to_dict()
            client.set_model_version_tag(
                ref.name, ref.version, TAG_GATE_PASSED, str(gate.passed).lower()
            )
            client.set_model_version_tag(
                ref.name, ref.version, TAG_GATE, json.dumps(gate.to_dict(), allow_nan=False)
            )
            _log_gate(client, ref, gate)
            if reg.promotion == "auto" and gate.passed:
                promote(ref.name, ref.version, alias=CHAMPION, tracking_uri=uri)
                result["promoted"] = True
        out[view] = result
    return out


def _log_gate(client: Any, ref: ModelRef, gate: GateDecision) -> None:
    """The gate's figures as metrics of the version's registration run."""
    from mlflow.entities import Metric

    mv = client.get_model_version(ref.name, ref.version)
    if not mv.run_id:
        return
    now = int(time.time() * 1000)
    metrics = [Metric(f"gate.{ref.view}.{k}", v, now, 0) for k, v in gate.figures.items()]
    metrics.append(Metric(f"gate.{ref.view}.passed", float(gate.passed), now, 0))
    client.log_batch(mv.run_id, metrics=metrics)
