"""Where ``qcloop serve`` gets its models, and how it swaps them without dropping a request.

A :class:`ModelSource` builds a :class:`ModelBundle` (one scorer per view, with the identity of
the models) and has a cheap ``fingerprint()`` that changes when the models it stands for change:

- :class:`RunSource`: a trained run folder; static.
- :class:`RegistrySource`: ``NAME@ALIAS`` in the MLflow model registry; its fingerprint is the
  versions the alias selects, so moving ``champion`` changes it.

A :class:`ModelManager` holds the bundle in use. Its poll loop (for sources that can change)
builds a new bundle in a worker thread, off the request path, then replaces the reference in one
assignment; a request takes the reference once when it starts, so requests in flight finish on
the models they started with, and no request waits for or fails during a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

__all__ = [
    "ModelBundle",
    "ModelManager",
    "ModelSource",
    "RegistrySource",
    "RunSource",
    "SourceError",
    "bundle_from_scorers",
]

RUNTIMES = ("torch", "onnxruntime")


class SourceError(RuntimeError):
    """Models that cannot be loaded from a source (missing run, export or registry version)."""


@dataclass
class ModelBundle:
    """The scorers in use, one per view, and what they are.

    Attributes:
        scorers: view -> an object with ``score(case) -> CaseResult`` (an
            :class:`~qcloop.monitor.ops.scoring.OnlineScorer`).
        fingerprint: the source's fingerprint these models were built for.
        runtime: ``"torch"`` or ``"onnxruntime"``.
        loaded_at: ISO-8601 UTC time the bundle was built.
    """

    scorers: dict[str, Any]
    fingerprint: str
    runtime: str
    loaded_at: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )

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


def bundle_from_scorers(scorers: dict[str, Any], fingerprint: str, runtime: str) -> ModelBundle:
    """A bundle of ready-made scorers (for sources that build their own)."""
    if not scorers:
        raise SourceError("no view to serve: the models hold no trained view")
    return ModelBundle(scorers=dict(scorers), fingerprint=fingerprint, runtime=runtime)


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


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise SourceError(f"unknown runtime {runtime!r}: expected 'torch' or 'onnxruntime'")


def _onnx_ready(onnx_dir: Path) -> bool:
    return (onnx_dir / "manifest.json").is_file()


def _load_scorers(
    run_dir: Path,
    views: list[str] | None,
    runtime: str,
    onnx_dir: Path | None,
    model_info: dict[str, Any],
    threads: int | None = None,
) -> dict[str, Any]:
    from qcloop.monitor.data import CaseError
    from qcloop.monitor.method.run_folder import RunError
    from qcloop.monitor.ops.scoring import load_online_scorers

    try:
        return load_online_scorers(
            run_dir,
            views,
            runtime=runtime,
            onnx_dir=onnx_dir,
            model_info=model_info,
            threads=threads,
        )
    except ImportError as exc:
        raise SourceError(
            f"{run_dir}: the {runtime} runtime cannot be loaded ({exc}); use --runtime torch"
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
        onnx_dir: ONNX export used with ``runtime="onnxruntime"`` (default ``RUN/onnx``).
        model_info: identity copied into every record (``version``, ``name``...).
        threads: intra-op threads of each ONNX Runtime session (``None``: its default).
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
        self.onnx_dir = Path(onnx_dir) if onnx_dir is not None else self.run_dir / "onnx"
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
            SourceError: not a run folder, or ``onnxruntime`` asked for without an export.
        """
        _check_runtime(runtime)
        if not (self.run_dir / "config.yaml").is_file():
            raise SourceError(f"{self.run_dir}: not a qcloop run folder (no config.yaml)")
        if runtime == "onnxruntime" and not _onnx_ready(self.onnx_dir):
            raise SourceError(
                f"{self.onnx_dir}: no ONNX export (manifest.json missing); run "
                f"`qcloop export-onnx --run {self.run_dir}` first, or serve with --runtime torch"
            )
        info = dict(self.model_info)
        info.setdefault("version", _run_version(self.run_dir))
        scorers = _load_scorers(self.run_dir, None, runtime, self.onnx_dir, info, self.threads)
        return bundle_from_scorers(scorers, self.fingerprint(), runtime)


def _run_version(run_dir: Path) -> str:
    """``run:<created time>`` from run.json: an identity for an unregistered run folder."""
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        return f"run:{info.get('created', 'unknown')}"
    except (OSError, ValueError):
        return "run:unknown"


class RegistrySource:
    """``NAME@ALIAS`` in the MLflow model registry (``qcloop serve --model qcloop@champion``).

    Its fingerprint is the version the alias selects for each view (a registry query, no
    download). ``load`` resolves the versions into local run folders; with ``onnxruntime`` a
    version folder without an ``onnx/`` export is exported once (with the parity check) into
    ``onnx_cache`` (default: beside the downloaded versions). ``threads``: intra-op threads of
    each ONNX Runtime session (``None``: its default).
    """

    dynamic = True

    def __init__(
        self,
        spec: str,
        tracking_uri: str | None = None,
        *,
        cache_dir: str | Path | None = None,
        onnx_cache: str | Path | None = None,
        threads: int | None = None,
    ) -> None:
        self.threads = threads
        self.spec = spec
        self.tracking_uri = tracking_uri
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.onnx_cache = Path(onnx_cache) if onnx_cache is not None else None

    def describe(self) -> str:
        """``registry:<spec>``."""
        return f"registry:{self.spec}"

    def fingerprint(self) -> str:
        """View -> version the spec selects now, as JSON."""
        from qcloop.monitor.ops.registry import alias_versions

        try:
            versions = alias_versions(self.spec, tracking_uri=self.tracking_uri)
        except Exception as exc:  # registry down or spec gone: report, keep serving
            raise SourceError(f"{self.spec}: cannot read the registry: {exc}") from exc
        return _versions_fingerprint(versions)

    def load(self, runtime: str) -> ModelBundle:
        """Scorers of every view the spec selects, each from its version's run folder."""
        from qcloop.monitor.ops.registry import default_cache_dir, resolve_model

        _check_runtime(runtime)
        try:
            refs = resolve_model(
                self.spec, tracking_uri=self.tracking_uri, cache_dir=self.cache_dir
            )
        except Exception as exc:
            raise SourceError(f"{self.spec}: cannot resolve the model: {exc}") from exc
        scorers: dict[str, Any] = {}
        for view, ref in sorted(refs.items()):
            run_dir = Path(ref.run_dir)
            onnx_dir = None
            if runtime == "onnxruntime":
                onnx_dir = run_dir / "onnx"
                if not _onnx_ready(onnx_dir):
                    cache = self.onnx_cache or (self.cache_dir or default_cache_dir()) / "onnx"
                    onnx_dir = cache / f"{ref.name}-{ref.version}"
                    if not _onnx_ready(onnx_dir):
                        _export(run_dir, onnx_dir, view)
            info = {
                "name": ref.name,
                "version": str(ref.version),
                "aliases": sorted(ref.aliases),
                "spec": self.spec,
            }
            scorers.update(_load_scorers(run_dir, [view], runtime, onnx_dir, info, self.threads))
        versions = {view: str(ref.version) for view, ref in refs.items()}
        return bundle_from_scorers(scorers, _versions_fingerprint(versions), runtime)


def _versions_fingerprint(versions: dict[str, Any]) -> str:
    return json.dumps({str(k): str(v) for k, v in versions.items()}, sort_keys=True)


def _export(run_dir: Path, onnx_dir: Path, view: str) -> None:
    """Export one view of a registered version to ONNX (with the parity check)."""
    try:
        from qcloop.deploy.onnx_export import export_run
    except ImportError as exc:
        raise SourceError(f"{run_dir}: ONNX export is not available ({exc})") from exc
    log.info("exporting %s (%s) to ONNX in %s", run_dir, view, onnx_dir)
    try:
        export_run(run_dir, onnx_dir, views=[view])
    except Exception as exc:
        raise SourceError(f"{run_dir}: ONNX export failed: {exc}") from exc


class ModelManager:
    """Holds the models in use and replaces them when the source changes.

    Args:
        source: where the models come from.
        runtime: ``"torch"`` or ``"onnxruntime"``.
        poll_s: seconds between fingerprint checks (dynamic sources only).
        on_swap: called with (old, new) bundles after a reload (e.g. to reset drift windows).
        on_failure: called with the error message when a load or reload fails.
    """

    def __init__(
        self,
        source: ModelSource,
        runtime: str,
        poll_s: float = 30.0,
        on_swap: Callable[[ModelBundle | None, ModelBundle], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        _check_runtime(runtime)
        self.source = source
        self.runtime = runtime
        self.poll_s = float(poll_s)
        self.on_swap = on_swap
        self.on_failure = on_failure
        self._bundle: ModelBundle | None = None
        self._lock = threading.Lock()
        self.reloads = 0
        self.reload_failures = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def bundle(self) -> ModelBundle | None:
        """The models in use now (``None`` until the first load succeeds)."""
        return self._bundle

    def install(self, bundle: ModelBundle) -> None:
        """Make ``bundle`` the models in use (one reference assignment)."""
        with self._lock:
            old, self._bundle = self._bundle, bundle
        if old is not None:
            self.reloads += 1
        log.info(
            "serving %s (%s): %s",
            self.source.describe(),
            bundle.runtime,
            {v: d["model"].get("version") for v, d in bundle.describe()["views"].items()},
        )
        for view, info in bundle.describe()["views"].items():
            log.info("%s runtime %s providers %s", view, info["runtime"], info["providers"])
        if self.on_swap is not None:
            try:
                self.on_swap(old, bundle)
            except Exception:  # a listener must not undo a reload
                log.exception("model swap listener failed")

    def load_now(self) -> ModelBundle:
        """Load the source's models in this thread and install them."""
        bundle = self.source.load(self.runtime)
        self.install(bundle)
        return bundle

    async def refresh(self) -> bool:
        """Check the source once; load and install new models if it changed. True if swapped.

        Loading runs in a worker thread; a failure is logged and the models in use stay.
        """
        try:
            current = self._bundle
            if current is not None and self.source.dynamic:
                fingerprint = await asyncio.to_thread(self.source.fingerprint)
                if fingerprint == current.fingerprint:
                    return False
            elif current is not None:
                return False
            bundle = await asyncio.to_thread(self.source.load, self.runtime)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.reload_failures += 1
            self.last_error = str(exc)
            log.error("model reload from %s failed: %s", self.source.describe(), exc)
            if self.on_failure is not None:
                self.on_failure(str(exc))
            return False
        self.last_error = None
        self.install(bundle)
        return True

    async def run(self) -> None:
        """Load the models if none are installed, then poll a dynamic source forever."""
        while True:
            await self.refresh()
            if self._bundle is not None and not self.source.dynamic:
                return
            await asyncio.sleep(self.poll_s)

    def start(self) -> None:
        """Start :meth:`run` as a task of the running event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        """Cancel the poll task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
