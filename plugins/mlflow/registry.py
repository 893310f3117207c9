"""The ``mlflow`` model registry: :class:`~qcloop.monitor.core.interfaces.ModelRegistry` on the
MLflow model registry (``registry.backend: {name: mlflow}``, the default).

A version of ``PREFIX-<VIEW>`` is one view's staged model set
(:mod:`qcloop.monitor.ops.run_package`), logged as the artifacts ``qcloop-<VIEW>/`` of a run in
the experiment ``qcloop-registry``; its source is ``runs:/<run id>/qcloop-<VIEW>``. Consumers get
a local run folder back, downloaded into a cache (``QCLOOP_MODEL_CACHE``) and checked against
the manifest. Aliases are MLflow registered-model aliases, lineage and the gate's verdict are
version tags, and the gate's figures are metrics of the registration run
(:meth:`MlflowRegistry.record_gate`).

This module only stores and reads: the lifecycle, its events and the promotion gate are the
core's (:mod:`qcloop.monitor.ops.promotion`). MLflow errors the registry does not handle itself
are raised as :class:`~qcloop.monitor.ops.run_package.RegistryUnavailableError` naming the store.
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qcloop.monitor.core.interfaces import AliasMove, ModelRef
from qcloop.monitor.ops.promotion import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    TAG_GATE,
    TAG_PREVIOUS_CHAMPION,
    TAG_ROLLED_BACK,
)
from qcloop.monitor.ops.run_package import (
    TAG_DIGEST,
    TAG_RUN_DIR,
    TAG_VIEW,
    RegistryError,
    RegistryUnavailableError,
    check_registration,
    package_tags,
    parse_spec,
    prefix_of,
    recorded_folder,
    registered_name,
    run_digest,
    run_views,
    spec_names,
    stage,
    view_of,
)
from qcloop.plugins.mlflow.cache import CACHE_ENV, default_cache_dir, download_version
from qcloop.plugins.mlflow.store import default_tracking_uri, make_client, require_mlflow

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.ops.promotion import GateDecision

__all__ = ["CACHE_ENV", "REGISTRY_EXPERIMENT", "MlflowRegistry", "default_cache_dir"]

#: MLflow experiment holding the runs whose artifacts back registered versions.
REGISTRY_EXPERIMENT = "qcloop-registry"
_READY_TIMEOUT_S = 300.0

_F = TypeVar("_F", bound=Callable[..., Any])


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def _aliases(rm: Any) -> dict[str, str]:
    """Alias -> version of a registered model, versions as strings (MLflow 3 returns ints)."""
    return {str(k): str(v) for k, v in (rm.aliases or {}).items()}


def _strs(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in dict(tags or {}).items()}


def _row(name: str, mv: Any, aliases: list[str] | None = None) -> dict[str, Any]:
    """One version as ``list_versions`` describes it."""
    tags = _strs(mv.tags)
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


def _store_errors(method: _F) -> _F:
    """MLflow errors the method does not handle, as :class:`RegistryUnavailableError`."""

    @functools.wraps(method)
    def wrapper(self: MlflowRegistry, *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return method(self, *args, **kwargs)
        except MlflowException as exc:
            raise RegistryUnavailableError(
                f"MLflow tracking store {self.uri}: {exc.message}"
            ) from exc

    return wrapper  # type: ignore[return-value]


class MlflowRegistry:
    """Registered qcloop model versions in an MLflow model registry.

    Args:
        uri: MLflow tracking (and registry) URI; default ``MLFLOW_TRACKING_URI``, else
            ``sqlite:///<cwd>/mlflow.db``.
        cache_dir: where downloaded versions are kept (default :func:`default_cache_dir`),
            one folder per store, model and version.
    """

    def __init__(self, uri: str | None = None, cache_dir: Path | None = None) -> None:
        require_mlflow("the MLflow model registry")
        self.uri = uri or default_tracking_uri()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._client: Any = None

    def __repr__(self) -> str:
        return f"MlflowRegistry(uri={self.uri!r}, cache_dir={str(self.cache_dir)!r})"

    @property
    def client(self) -> Any:
        """The ``MlflowClient`` (built on first use)."""
        if self._client is None:
            self._client = make_client(self.uri)
        return self._client

    # ------------------------------------------------------------------ lookups

    def _registered_model(self, name: str) -> Any | None:
        """The registered model ``name``, or None when it does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException as exc:
            if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _existing_model(self, name: str) -> Any:
        rm = self._registered_model(name)
        if rm is None:
            raise RegistryError(f"no registered model {name!r} (registered: {self._known()})")
        return rm

    def _model_version(self, name: str, version: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            if _error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise RegistryError(f"model {name!r} has no version {version!r}") from None
            raise

    def _known(self) -> str:
        """The registered models' names, for error messages."""
        try:
            names = sorted(m.name for m in self.client.search_registered_models(max_results=100))
        except Exception:  # a listing is a courtesy in an error message only
            return "unknown"
        return ", ".join(names) or "none"

    def _spec_targets(self, spec: str) -> list[tuple[str, Any]]:
        """(registered model name, model version) for every view a spec selects."""
        parsed = parse_spec(spec)
        if parsed.version is not None:
            if self._registered_model(parsed.base) is None:
                raise RegistryError(
                    f"model spec {spec!r}: no registered model {parsed.base!r} "
                    f"(registered: {self._known()})"
                )
            return [(parsed.base, self._model_version(parsed.base, parsed.version))]
        names = spec_names(parsed)
        found, missing_alias = [], []
        for name in names:
            rm = self._registered_model(name)
            if rm is None:
                continue
            version = _aliases(rm).get(str(parsed.alias))
            if version is None:
                missing_alias.append(
                    f"{name} (aliases: {', '.join(sorted(rm.aliases or {})) or 'none'})"
                )
                continue
            found.append((name, self._model_version(name, version)))
        if found:
            return found
        if missing_alias:
            raise RegistryError(
                f"model spec {spec!r}: no version carries alias {parsed.alias!r} in "
                + "; ".join(missing_alias)
            )
        raise RegistryError(
            f"model spec {spec!r}: no registered model {' or '.join(repr(n) for n in names)} "
            f"(registered: {self._known()})"
        )

    def _versions_with_digest(self, name: str, digest: str) -> list[Any]:
        found = self.client.search_model_versions(f"name = '{name}'")
        return sorted(
            (mv for mv in found if dict(mv.tags or {}).get(TAG_DIGEST) == digest),
            key=lambda mv: int(mv.version),
        )

    # ------------------------------------------------------------------ local copies

    def _ref(self, name: str, mv: Any, run_dir: Path) -> ModelRef:
        tags = _strs(mv.tags)
        return ModelRef(
            name=name,
            view=view_of(name, str(mv.version), tags),
            version=str(mv.version),
            run_dir=run_dir,
            aliases=sorted(mv.aliases or []),
            tags=tags,
        )

    def _download(self, name: str, mv: Any) -> Path:
        """A verified local copy of version ``mv`` in the cache."""
        return download_version(self.client, self.uri, self.cache_dir, name, mv)

    def _local_or_download(self, name: str, mv: Any) -> Path:
        """The run folder recorded at registration when it still holds exactly this version's
        files, else a verified download."""
        local = recorded_folder(_strs(mv.tags), view_of(name, str(mv.version), _strs(mv.tags)))
        return local if local is not None else self._download(name, mv)

    # ------------------------------------------------------------------ registration

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(REGISTRY_EXPERIMENT)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            return str(self.client.create_experiment(REGISTRY_EXPERIMENT))
        except MlflowException:  # created meanwhile
            exp = self.client.get_experiment_by_name(REGISTRY_EXPERIMENT)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def _ensure_registered_model(self, name: str, view: str) -> None:
        from mlflow.exceptions import MlflowException

        if self._registered_model(name) is not None:
            return
        try:
            self.client.create_registered_model(
                name,
                tags={TAG_VIEW: view},
                description=f"qcloop {view} model sets: candidate segmenters, QC module, fences",
            )
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise

    def _wait_ready(self, name: str, version: str) -> Any:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            mv = self.client.get_model_version(name, version)
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

    def _log_views(self, run: Path, views: Sequence[str], run_id: str) -> dict[str, str]:
        """Stage and log every view's model set; return each view's digest."""
        digests = {}
        with tempfile.TemporaryDirectory(prefix="qcloop-register-") as tmp:
            for view in views:
                staged = Path(tmp) / view
                digests[view] = stage(run, view, staged)
                self.client.log_artifacts(run_id, str(staged), f"qcloop-{view}")
        return digests

    @_store_errors
    def register(
        self,
        run_dir: Path,
        *,
        name_prefix: str,
        views: Sequence[str] | None = None,
        tags: Mapping[str, str] | None = None,
        view_tags: Mapping[str, Mapping[str, str]] | None = None,
    ) -> dict[str, ModelRef]:
        """A new READY version of ``PREFIX-<VIEW>`` per view, from one MLflow run whose
        artifacts hold the staged model sets; tags: the package's, then ``tags``, then
        ``view_tags[view]``. Moves no alias."""
        run = Path(run_dir)
        info, chosen = check_registration(run, name_prefix, views)
        run_tags = {TAG_RUN_DIR: str(run.resolve()), "qcloop.views": ",".join(chosen)}
        mlrun = self.client.create_run(
            self._experiment_id(), run_name=f"register {run.name}", tags=run_tags
        )
        run_id = mlrun.info.run_id
        refs = {}
        try:
            digests = self._log_views(run, chosen, run_id)
            for view in chosen:
                name = registered_name(name_prefix, view)
                self._ensure_registered_model(name, view)
                vtags = package_tags(run, info, view, digests[view])
                vtags.update({**_strs(tags), **_strs((view_tags or {}).get(view))})
                mv = self.client.create_model_version(
                    name,
                    f"runs:/{run_id}/qcloop-{view}",
                    run_id=run_id,
                    tags=vtags,
                    description=f"{info.get('kind', 'run')} {view} model set from {run.resolve()}",
                )
                refs[view] = self._ref(name, self._wait_ready(name, str(mv.version)), run)
            self.client.set_terminated(run_id, "FINISHED")
        except BaseException:
            with contextlib.suppress(Exception):  # never mask the original error
                self.client.set_terminated(run_id, "FAILED")
            raise
        return refs

    @_store_errors
    def find(self, run_dir: Path, *, name_prefix: str) -> dict[str, ModelRef]:
        """Per view, the newest version holding exactly this run folder's files."""
        run = Path(run_dir)
        found = {}
        for view in run_views(run):
            name = registered_name(name_prefix, view)
            if self._registered_model(name) is None:
                continue
            try:
                digest = run_digest(run, view)
            except RegistryError:
                continue
            versions = self._versions_with_digest(name, digest)
            if versions:
                mv = self.client.get_model_version(name, str(versions[-1].version))
                found[view] = self._ref(name, mv, run)
        return found

    # ------------------------------------------------------------------ reading

    @_store_errors
    def resolve(self, spec: str) -> dict[str, ModelRef]:
        """View -> version ``spec`` selects, each downloaded once into the cache and verified."""
        refs = {}
        for name, mv in self._spec_targets(spec):
            ref = self._ref(name, mv, self._download(name, mv))
            refs[ref.view] = ref
        return refs

    @_store_errors
    def alias_versions(self, spec: str) -> dict[str, str]:
        """View -> version ``spec`` selects now (no download: cheap enough to poll)."""
        return {
            view_of(name, str(mv.version), _strs(mv.tags)): str(mv.version)
            for name, mv in self._spec_targets(spec)
        }

    @_store_errors
    def list_versions(self, name_prefix: str | None = None) -> list[dict[str, Any]]:
        """Every version of the qcloop models (``PREFIX-<VIEW>``, or every model with a
        ``qcloop.view`` tag), by name and newest first."""
        rows = []
        for rm in self.client.search_registered_models(max_results=1000):
            prefix = prefix_of(rm.name)
            if name_prefix is not None and prefix != name_prefix:
                continue
            if name_prefix is None and not (prefix or TAG_VIEW in dict(rm.tags or {})):
                continue
            # search results carry no aliases: take them from the registered model
            by_version: dict[str, list[str]] = {}
            for alias, version in _aliases(rm).items():
                by_version.setdefault(version, []).append(alias)
            rows.extend(
                _row(rm.name, mv, by_version.get(str(mv.version), []))
                for mv in self.client.search_model_versions(f"name = '{rm.name}'")
            )
        rows.sort(key=lambda r: (r["name"], -int(r["version"])))
        return rows

    @_store_errors
    def get_version(self, name: str, version: str) -> dict[str, Any]:
        """One version as :meth:`list_versions` describes it."""
        self._existing_model(name)
        return _row(name, self._model_version(name, version))

    # ------------------------------------------------------------------ writing

    @_store_errors
    def set_alias(self, name: str, version: str, alias: str) -> AliasMove:
        """Move ``alias`` to ``version`` (READY only); the version it leaves gets
        ``previous-<alias>`` and is recorded on the new one (tag ``qcloop.previous_<alias>``).
        A champion that was the challenger loses the challenger alias."""
        self._existing_model(name)
        mv = self._model_version(name, version)
        if str(mv.status) != "READY":
            raise RegistryError(f"model {name!r} version {version} is {mv.status}, not READY")
        version = str(mv.version)
        client = self.client
        aliases = _aliases(client.get_registered_model(name))
        previous = aliases.get(alias)
        if previous != version:
            if previous is not None:
                client.set_model_version_tag(name, version, f"qcloop.previous_{alias}", previous)
                client.set_registered_model_alias(name, f"{PREVIOUS}{alias}", previous)
            client.set_registered_model_alias(name, alias, version)
            if alias == CHAMPION and aliases.get(CHALLENGER) == version:
                client.delete_registered_model_alias(name, CHALLENGER)
        mv = client.get_model_version(name, version)
        return AliasMove(self._ref(name, mv, self._local_or_download(name, mv)), alias, previous)

    @_store_errors
    def rollback(self, name: str) -> AliasMove:
        """Move ``champion`` back to ``previous-champion``; the version before that, if
        recorded, becomes ``previous-champion``. The replaced version is tagged
        ``qcloop.rolled_back``."""
        aliases = _aliases(self._existing_model(name))
        current = aliases.get(CHAMPION)
        target = aliases.get(f"{PREVIOUS}{CHAMPION}")
        if current is None:
            raise RegistryError(f"model {name!r} has no champion to roll back")
        if target is None:
            raise RegistryError(f"model {name!r}: no previous champion recorded to roll back to")
        before = dict(self._model_version(name, target).tags or {}).get(TAG_PREVIOUS_CHAMPION)
        client = self.client
        client.set_registered_model_alias(name, CHAMPION, target)
        client.set_model_version_tag(
            name, current, TAG_ROLLED_BACK, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        )
        if before and before != target:
            client.set_registered_model_alias(name, f"{PREVIOUS}{CHAMPION}", before)
        else:
            client.delete_registered_model_alias(name, f"{PREVIOUS}{CHAMPION}")
        mv = client.get_model_version(name, target)
        return AliasMove(self._ref(name, mv, self._local_or_download(name, mv)), CHAMPION, current)

    @_store_errors
    def set_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        """Add or overwrite tags of one version."""
        self._existing_model(name)
        mv = self._model_version(name, version)
        for key, value in _strs(tags).items():
            self.client.set_model_version_tag(name, str(mv.version), key, value)

    @_store_errors
    def record_gate(self, ref: ModelRef, gate: GateDecision) -> None:
        """The gate's figures (and ``passed`` as 0/1) as metrics ``gate.<VIEW>.<figure>`` of
        the version's registration run."""
        from mlflow.entities import Metric

        mv = self.client.get_model_version(ref.name, ref.version)
        if not mv.run_id:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(f"gate.{ref.view}.{k}", v, now, 0) for k, v in gate.figures.items()]
        metrics.append(Metric(f"gate.{ref.view}.passed", float(gate.passed), now, 0))
        self.client.log_batch(mv.run_id, metrics=metrics)
