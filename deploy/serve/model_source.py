"""Where ``qcloop serve`` gets its models.

A :class:`ModelSource` builds a :class:`ModelBundle` (one scorer per view, with the identity of
the models) and has a cheap ``fingerprint()`` that changes when the models it stands for change:

- :class:`RunSource`: a trained run folder; static.
- :class:`RegistrySource`: ``NAME@ALIAS`` in the configured model registry (a plugin kind; MLflow
  by default); its fingerprint is the versions the alias selects, so moving ``champion``
  changes it.

Scorers run on any registered runtime (``serving.runtime``); the sources pass a runtime only the
parameters its factory takes.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

__all__ = [
    "ModelBundle",
    "ModelSource",
    "RegistrySource",
    "RunSource",
    "SourceError",
    "bundle_from_scorers",
    "check_runtime",
]


class SourceError(RuntimeError):
    """Models that cannot be loaded from a source (missing run, export or registry version)."""


@dataclass
class ModelBundle:
    """The scorers in use, one per view, and what they are.

    Attributes:
        scorers: view -> an object with ``score(case) -> CaseResult`` (an
            :class:`~qcloop.monitor.ops.scoring.OnlineScorer`).
        fingerprint: the source's fingerprint these models were built for.
        runtime: the registered runtime they run on.
        loaded_at: ISO-8601 UTC time the bundle was built.
        reference_medians: view -> the median decision pDC of the model's calibration cases,
            where its fences recorded it (the drift window's reference).
    """

    scorers: dict[str, Any]
    fingerprint: str
    runtime: str
    loaded_at: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    reference_medians: dict[str, float | None] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """Versions, runtime and providers per view (what ``GET /v1/models`` shows)."""
        views = {}
        for view, scorer in sorted(self.scorers.items()):
            runtime = getattr(scorer, "runtime", None)
            views[view] = {
                "model": dict(getattr(scorer, "model_info", {}) or {}),
                "runtime": getattr(runtime, "name", self.runtime),
                "providers": list(runtime.providers()) if runtime is not None else [],
                "candidates": int(getattr(runtime, "n_candidates", 0) or 0),
                "input_size": int(getattr(runtime, "input_size", 0) or 0),
            }
        return {
            "fingerprint": self.fingerprint,
            "runtime": self.runtime,
            "loaded_at": self.loaded_at,
            "views": views,
        }


def bundle_from_scorers(
    scorers: dict[str, Any],
    fingerprint: str,
    runtime: str,
    reference_medians: dict[str, float | None] | None = None,
) -> ModelBundle:
    """A bundle of ready-made scorers (for sources that build their own)."""
    if not scorers:
        raise SourceError("no view to serve: the models hold no trained view")
    return ModelBundle(
        scorers=dict(scorers),
        fingerprint=fingerprint,
        runtime=runtime,
        reference_medians=dict(reference_medians or {}),
    )


@runtime_checkable
class ModelSource(Protocol):
    """Where a server's models come from."""

    #: whether the models can change while serving (then the manager polls ``fingerprint``).
    dynamic: bool

    def describe(self) -> str:
        """A one-line description for logs and ``/v1/models``."""
        ...

    def fingerprint(self) -> str:
        """Cheap identity of the models the source stands for now."""
        ...

    def load(self, runtime: str) -> ModelBundle:
        """Build scorers for the models the source stands for (slow: loads networks)."""
        ...


def _runtime_factory(runtime: str) -> Any:
    from qcloop.monitor.core.plugin_manager import UnknownComponentError, get_plugin_manager

    try:
        return get_plugin_manager().runtimes()[runtime].factory
    except UnknownComponentError as exc:
        raise SourceError(str(exc)) from None


def check_runtime(runtime: str) -> None:
    """Raise :class:`SourceError` (listing the registered ones) unless ``runtime`` is one."""
    _runtime_factory(runtime)


def runtime_params(
    runtime: str, given: dict[str, Any], optional: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Keyword parameters for ``runtime``'s factory: every ``given`` one (an error when the
    factory does not take it) and the ``optional`` ones it takes; ``None`` values are left out
    (the factory's default)."""
    factory = _runtime_factory(runtime)
    given = {k: v for k, v in given.items() if v is not None}
    optional = {k: v for k, v in (optional or {}).items() if v is not None}
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return {**optional, **given}
    refused = sorted(set(given) - set(parameters))
    if refused:
        raise SourceError(f"runtime {runtime!r} takes no parameter {', '.join(refused)}")
    return {**{k: v for k, v in optional.items() if k in parameters}, **given}


def _reference_median(run_dir: Path, view: str) -> float | None:
    """The calibration median decision pDC recorded with ``view``'s fences, if any."""
    from qcloop.monitor.method.run_folder import RunError, load_view_fences

    try:
        fences = load_view_fences(run_dir, view)
    except RunError:
        return None
    return fences.reference_median if fences is not None else None


def _load_scorers(
    run_dir: Path,
    views: list[str] | None,
    runtime: str,
    model_info: dict[str, Any],
    params: dict[str, Any],
) -> dict[str, Any]:
    """Scorers of ``views`` (default every trained view) on ``runtime``; every failure is a
    :class:`SourceError` naming the run folder."""
    from qcloop.monitor.data import CaseError
    from qcloop.monitor.method.run_folder import RunError
    from qcloop.monitor.ops.scoring import load_online_scorers

    try:
        return load_online_scorers(run_dir, views, runtime=runtime, model_info=model_info, **params)
    except ImportError as exc:
        raise SourceError(
            f"{run_dir}: the {runtime} runtime cannot be loaded ({exc}); install it or serve "
            "with another --runtime"
        ) from exc
    except (RunError, CaseError, OSError, ValueError) as exc:
        raise SourceError(f"{run_dir}: cannot load the models: {exc}") from exc
    except Exception as exc:  # e.g. an ONNX export that fails its checks (ExportError)
        raise SourceError(
            f"{run_dir}: cannot load the models ({type(exc).__name__}: {exc})"
        ) from exc


class RunSource:
    """The models of one trained run folder (``qcloop serve --run RUN``); never changes.

    Args:
        run_dir: the run folder.
        onnx_dir: the export the ``onnxruntime`` runtime runs (default ``RUN/onnx``); an error
            with a runtime that takes no ``onnx_dir``.
        model_info: identity copied into every record (``version``, ``name``...).
        threads: intra-op threads per session, for runtimes that take ``threads``.
    """

    dynamic = False

    def __init__(
        self,
        run_dir: str | Path,
        *,
        onnx_dir: str | Path | None = None,
        model_info: dict[str, Any] | None = None,
        threads: int | None = None,
    ) -> None:
        self.threads = threads
        self.run_dir = Path(run_dir)
        self.onnx_dir = Path(onnx_dir) if onnx_dir is not None else None
        self.model_info = dict(model_info or {})

    def describe(self) -> str:
        """``run:<folder>``."""
        return f"run:{self.run_dir.resolve()}"

    def fingerprint(self) -> str:
        """The folder and the identity given (a run folder is served as it was loaded)."""
        return json.dumps({"run": str(self.run_dir.resolve()), **self.model_info}, sort_keys=True)

    def load(self, runtime: str) -> ModelBundle:
        """Scorers of every trained view of the run.

        Raises:
            SourceError: not a run folder, an unknown runtime, or models it cannot load (an
                ``onnxruntime`` asked for without an export says how to make one).
        """
        params = runtime_params(runtime, {"onnx_dir": self.onnx_dir}, {"threads": self.threads})
        if not (self.run_dir / "config.yaml").is_file():
            raise SourceError(f"{self.run_dir}: not a qcloop run folder (no config.yaml)")
        info = dict(self.model_info)
        info.setdefault("version", _run_version(self.run_dir))
        scorers = _load_scorers(self.run_dir, None, runtime, info, params)
        references = {view: _reference_median(self.run_dir, view) for view in scorers}
        return bundle_from_scorers(scorers, self.fingerprint(), runtime, references)


def _run_version(run_dir: Path) -> str:
    """``run:<created time>`` from run.json: an identity for an unregistered run folder."""
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        return f"run:{info.get('created', 'unknown')}"
    except (OSError, ValueError):
        return "run:unknown"


def _default_onnx_cache() -> Path:
    """Where registered versions are exported for ``onnxruntime``: beside the downloaded
    versions (``QCLOOP_MODEL_CACHE``, else the user cache)."""
    env = os.environ.get("QCLOOP_MODEL_CACHE")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qcloop" / "models"
    return (Path(env) if env else base) / "onnx"


def _export(run_dir: Path, onnx_dir: Path, view: str) -> None:
    """Export one view of a registered version to ONNX (with the parity check)."""
    try:
        from qcloop.deploy.onnx.export import export_run
    except ImportError as exc:
        raise SourceError(f"{run_dir}: ONNX export is not available ({exc})") from exc
    log.info("exporting %s (%s) to ONNX in %s", run_dir, view, onnx_dir)
    try:
        export_run(run_dir, onnx_dir, views=[view])
    except Exception as exc:
        raise SourceError(f"{run_dir}: ONNX export failed: {exc}") from exc


def _onnx_export_of(ref: Any, view: str, cache: Path) -> dict[str, Any]:
    """The ``onnxruntime`` parameters of a registered version: its own ``onnx/`` export, else
    one made once into ``cache/NAME-VERSION``."""
    run_dir = Path(ref.run_dir)
    onnx_dir = run_dir / "onnx"
    if not (onnx_dir / "manifest.json").is_file():
        onnx_dir = cache / f"{ref.name}-{ref.version}"
        if not (onnx_dir / "manifest.json").is_file():
            _export(run_dir, onnx_dir, view)
    return {"onnx_dir": onnx_dir}


class RegistrySource:
    """``NAME@ALIAS`` in the model registry (``qcloop serve --model qcloop@champion``).

    Its fingerprint is the version the alias selects for each view (a registry query, no
    download). ``load`` resolves the versions into local run folders; with ``onnxruntime`` a
    version folder without an ``onnx/`` export is exported once (with the parity check) into
    ``onnx_cache`` (default: beside the downloaded versions).

    Args:
        spec: ``PREFIX@ALIAS`` (every view), ``PREFIX-SA@ALIAS`` or ``PREFIX-SA/3``.
        tracking_uri: the registry's URI (default: the configuration's, else the backend's).
        cfg: the configuration whose ``registry`` section names the backend (default: the
            built-in defaults, MLflow).
        registry: a ready ``ModelRegistry`` (then ``cfg``, ``tracking_uri`` and ``cache_dir``
            are not used to build one).
        cache_dir: where the registry keeps downloaded versions (default: the backend's).
        onnx_cache: where versions are exported for ``onnxruntime``.
        threads: intra-op threads per session, for runtimes that take ``threads``.
    """

    dynamic = True

    def __init__(
        self,
        spec: str,
        tracking_uri: str | None = None,
        *,
        cfg: Any = None,
        registry: Any = None,
        cache_dir: str | Path | None = None,
        onnx_cache: str | Path | None = None,
        threads: int | None = None,
    ) -> None:
        self.spec = spec
        self.tracking_uri = tracking_uri
        self.cfg = cfg
        self.threads = threads
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.onnx_cache = Path(onnx_cache) if onnx_cache is not None else None
        self._registry = registry
        self._registry_lock = threading.Lock()

    def describe(self) -> str:
        """``registry:<spec>``."""
        return f"registry:{self.spec}"

    def registry(self) -> Any:
        """The ``ModelRegistry`` (built on first use from the configuration)."""
        with self._registry_lock:
            if self._registry is None:
                from qcloop.monitor.core.config import QcloopConfig
                from qcloop.monitor.core.resolve import build_model_registry

                params = {"cache_dir": self.cache_dir} if self.cache_dir is not None else {}
                cfg = self.cfg if self.cfg is not None else QcloopConfig()
                self._registry = build_model_registry(cfg, uri=self.tracking_uri, **params)
            return self._registry

    def fingerprint(self) -> str:
        """View -> version the spec selects now, as JSON."""
        try:
            versions = self.registry().alias_versions(self.spec)
        except Exception as exc:  # registry down or spec gone: report, keep serving
            raise SourceError(f"{self.spec}: cannot read the registry: {exc}") from exc
        return _versions_fingerprint(versions)

    def _runtime_params(self, runtime: str, ref: Any, view: str) -> dict[str, Any]:
        """What ``runtime`` needs of a registered version (an ONNX export for
        ``onnxruntime``, the runtime this plugin provides), and the thread count."""
        given = {}
        if runtime == "onnxruntime":
            given = _onnx_export_of(ref, view, self.onnx_cache or _default_onnx_cache())
        return runtime_params(runtime, given, {"threads": self.threads})

    def load(self, runtime: str) -> ModelBundle:
        """Scorers of every view the spec selects, each from its version's run folder."""
        check_runtime(runtime)
        try:
            refs = self.registry().resolve(self.spec)
        except Exception as exc:
            raise SourceError(f"{self.spec}: cannot resolve the model: {exc}") from exc
        scorers: dict[str, Any] = {}
        references: dict[str, float | None] = {}
        for view, ref in sorted(refs.items()):
            run_dir = Path(ref.run_dir)
            info = {
                "name": ref.name,
                "version": str(ref.version),
                "aliases": sorted(ref.aliases),
                "spec": self.spec,
            }
            params = self._runtime_params(runtime, ref, view)
            scorers.update(_load_scorers(run_dir, [view], runtime, info, params))
            references[view] = _reference_median(run_dir, view)
        versions = {view: str(ref.version) for view, ref in refs.items()}
        return bundle_from_scorers(scorers, _versions_fingerprint(versions), runtime, references)


def _versions_fingerprint(versions: dict[str, Any]) -> str:
    return json.dumps({str(k): str(v) for k, v in versions.items()}, sort_keys=True)
