"""The plugin manager and the component registries it builds.

Built-in plugins are the modules in :data:`DEFAULT_PLUGINS`; third-party plugins arrive through
the entry-point group ``qcloop``. Both are loaded by name, the same way, and either can be
blocked. Environment variables:

* ``QCLOOP_LOAD_PLUGINS``: comma-separated allow-list of plugin (entry-point) or distribution
  names; set but empty means none.
* ``QCLOOP_DISABLE_PLUGIN_AUTOLOAD``: any non-empty value loads no entry-point plugin at all.
* ``QCLOOP_BLOCK_PLUGINS``: comma-separated plugin names never to load, built-ins included
  (``qcloop plugins --all`` shows the names); the configuration's ``plugins.block`` list does
  the same for one configuration (:func:`apply_plugin_settings`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from qcloop.monitor.core import hookspecs

if TYPE_CHECKING:  # pragma: no cover
    import click

    from qcloop.monitor.core.events import Event, ServiceInfo

__all__ = [
    "BLOCK_PLUGINS_ENV",
    "COMPONENT_KINDS",
    "DEFAULT_PLUGINS",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "LOAD_PLUGINS_ENV",
    "ComponentRegistry",
    "DuplicateComponentError",
    "PluginLoadError",
    "QcloopPluginManager",
    "RegisteredComponent",
    "UnknownComponentError",
    "apply_plugin_settings",
    "get_plugin_manager",
    "make_plugin_manager",
    "reset_plugin_manager",
]

logger = logging.getLogger(__name__)

#: Project name of the hook markers, and the entry-point group third-party plugins use.
ENTRY_POINT_GROUP = "qcloop"
LOAD_PLUGINS_ENV = "QCLOOP_LOAD_PLUGINS"
DISABLE_AUTOLOAD_ENV = "QCLOOP_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_PLUGINS_ENV = "QCLOOP_BLOCK_PLUGINS"

#: Built-in plugins, registered under their module path; a module not (yet) present is skipped.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "qcloop.segmenters.plugin",
    "qcloop.segmenters.external",
    "qcloop.segmenters.nnunet",
    "qcloop.qc_modules.plugin",
    "qcloop.plugins.thresholds",
    "qcloop.plugins.refiners",
    "qcloop.plugins.calibrators",
    "qcloop.monitor.ops.torch_runtime",
    "qcloop.monitor.method.engines",
    "qcloop.plugins.mlflow.plugin",
    "qcloop.plugins.prometheus.exporter",
    "qcloop.deploy.plugin",
)

#: Component kind -> (registering hook, singular noun used in messages).
COMPONENT_KINDS: dict[str, tuple[str, str]] = {
    "segmenters": ("register_segmenters", "segmenter"),
    "qc_modules": ("register_qc_modules", "QC module"),
    "threshold_strategies": ("register_threshold_strategies", "threshold strategy"),
    "refiners": ("register_refiners", "refiner"),
    "runtimes": ("register_runtimes", "runtime"),
    "engines": ("register_engines", "engine"),
    "calibrators": ("register_calibrators", "calibrator"),
    "model_kinds": ("register_model_kinds", "model kind"),
    "model_registries": ("register_model_registries", "model registry"),
    "trackers": ("register_trackers", "tracker"),
}


class DuplicateComponentError(ValueError):
    """Two registrations of one component name within one kind."""


class UnknownComponentError(KeyError, ValueError):
    """A component name that no plugin registered (a ``KeyError`` for lookups, a
    ``ValueError`` for callers that validate names)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PluginLoadError(RuntimeError):
    """An entry-point plugin could not be imported."""


@dataclass(frozen=True)
class RegisteredComponent:
    """One registered component: its name, its factory and the plugin that registered it."""

    name: str
    factory: Callable[..., Any]
    plugin: str


class ComponentRegistry(Mapping[str, RegisteredComponent]):
    """The components of one kind, by name."""

    def __init__(self, kind: str, components: Mapping[str, RegisteredComponent]) -> None:
        self.kind = kind
        self._components = dict(components)

    def __getitem__(self, name: str) -> RegisteredComponent:
        try:
            return self._components[name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(name)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._components

    def __iter__(self) -> Iterator[str]:
        return iter(self._components)

    def __len__(self) -> int:
        return len(self._components)

    def __repr__(self) -> str:
        return f"ComponentRegistry({self.kind!r}, {sorted(self._components)!r})"

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._components)

    def plugin_of(self, name: str) -> str:
        """Name of the plugin that registered ``name``."""
        return self[name].plugin

    def unknown_message(self, name: str) -> str:
        """The message for an unknown ``name``, listing the available names."""
        noun = COMPONENT_KINDS.get(self.kind, (None, self.kind))[1]
        available = ", ".join(self.names()) or "none registered"
        return f"unknown {noun} {name!r} (available: {available})"

    def create(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        """Build the component ``name`` by calling its factory with ``params`` as keywords."""
        return self[name].factory(**dict(params or {}))


def _normalise_dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_names(variable: str) -> list[str]:
    """The comma-separated names in environment variable ``variable`` (none when unset)."""
    return [part.strip() for part in os.environ.get(variable, "").split(",") if part.strip()]


def _env_allow_list() -> set[str] | None:
    """Names allowed by ``QCLOOP_LOAD_PLUGINS``; None when the variable is unset."""
    raw = os.environ.get(LOAD_PLUGINS_ENV)
    if raw is None:
        return None
    return {_normalise_dist_name(part.strip()) for part in raw.split(",") if part.strip()}


class QcloopPluginManager(pluggy.PluginManager):
    """The pluggy plugin manager of qcloop, with typed access to registries and events."""

    def __init__(self) -> None:
        super().__init__(ENTRY_POINT_GROUP)
        self.add_hookspecs(hookspecs)
        for name in _env_names(BLOCK_PLUGINS_ENV):
            self.set_blocked(name)
        #: plugin name -> (distribution name, version) for entry-point plugins.
        self.distributions: dict[str, tuple[str, str]] = {}

    # ----------------------------------------------------------------------- loading

    def load_builtins(self) -> list[str]:
        """Register the modules of :data:`DEFAULT_PLUGINS` that exist; return their names."""
        loaded = []
        for module_name in DEFAULT_PLUGINS:
            if self.has_plugin(module_name) or self.is_blocked(module_name):
                continue
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                logger.debug("built-in plugin %s is not present; skipped", module_name)
                continue
            self.register(module, name=module_name)
            loaded.append(module_name)
        return loaded

    def load_entrypoint_plugins(self) -> list[str]:
        """Register the allowed plugins of the ``qcloop`` entry-point group; return their names."""
        if os.environ.get(DISABLE_AUTOLOAD_ENV):
            logger.debug("%s is set: no entry-point plugins loaded", DISABLE_AUTOLOAD_ENV)
            return []
        allowed = _env_allow_list()
        matched: set[str] = set()
        loaded = []
        for dist in list(importlib.metadata.distributions()):
            dist_name = dist.metadata["Name"] or ""
            for ep in dist.entry_points.select(group=ENTRY_POINT_GROUP):
                if self.has_plugin(ep.name) or self.is_blocked(ep.name):
                    continue
                names = {_normalise_dist_name(ep.name), _normalise_dist_name(dist_name)}
                if allowed is not None and not names & allowed:
                    logger.debug("plugin %s not in %s; skipped", ep.name, LOAD_PLUGINS_ENV)
                    continue
                matched |= names
                try:
                    plugin = ep.load()
                except Exception as exc:
                    raise PluginLoadError(
                        f"cannot load qcloop plugin {ep.name!r} ({ep.value}) from distribution "
                        f"{dist_name!r}: {exc}; set {DISABLE_AUTOLOAD_ENV}=1 to start without "
                        "third-party plugins"
                    ) from exc
                self.register(plugin, name=ep.name)
                self.distributions[ep.name] = (dist_name, dist.version or "")
                loaded.append(ep.name)
        for name in sorted((allowed or set()) - matched):
            logger.warning(
                "%s names %r, but no installed plugin has that name", LOAD_PLUGINS_ENV, name
            )
        return loaded

    def is_builtin(self, plugin_name: str) -> bool:
        """Whether ``plugin_name`` is one of :data:`DEFAULT_PLUGINS`."""
        return plugin_name in DEFAULT_PLUGINS

    # ----------------------------------------------------------------------- components

    def _registrations(self, kind: str) -> Iterator[tuple[str, str, Callable[..., Any]]]:
        """(plugin, component name, factory) for every registration of ``kind``, in order."""
        hook_name = COMPONENT_KINDS[kind][0]
        caller = getattr(self.hook, hook_name)
        for impl in caller.get_hookimpls():
            if impl.hookwrapper or impl.wrapper:
                continue
            found: list[tuple[str, Callable[..., Any]]] = []

            def register(
                name: str,
                factory: Callable[..., Any],
                _found: list[tuple[str, Callable[..., Any]]] = found,
                _plugin: str = impl.plugin_name,
            ) -> None:
                if not isinstance(name, str) or not name:
                    raise TypeError(f"plugin {_plugin!r}: component name must be a non-empty str")
                if not callable(factory):
                    raise TypeError(f"plugin {_plugin!r}: factory for {name!r} is not callable")
                _found.append((name, factory))

            impl.function(**{arg: register for arg in impl.argnames})
            for name, factory in found:
                yield impl.plugin_name, name, factory

    def registry(self, kind: str) -> ComponentRegistry:
        """The registry of one component kind (a key of :data:`COMPONENT_KINDS`)."""
        if kind not in COMPONENT_KINDS:
            raise ValueError(f"unknown component kind {kind!r}; one of {sorted(COMPONENT_KINDS)}")
        components: dict[str, RegisteredComponent] = {}
        for plugin, name, factory in self._registrations(kind):
            if name in components:
                noun = COMPONENT_KINDS[kind][1]
                raise DuplicateComponentError(
                    f"{noun} {name!r} is registered by both plugin "
                    f"{components[name].plugin!r} and plugin {plugin!r}"
                )
            components[name] = RegisteredComponent(name, factory, plugin)
        return ComponentRegistry(kind, components)

    def segmenters(self) -> ComponentRegistry:
        """Registered segmenter factories."""
        return self.registry("segmenters")

    def qc_modules(self) -> ComponentRegistry:
        """Registered QC-module factories."""
        return self.registry("qc_modules")

    def threshold_strategies(self) -> ComponentRegistry:
        """Registered threshold-strategy factories."""
        return self.registry("threshold_strategies")

    def refiners(self) -> ComponentRegistry:
        """Registered refiner factories."""
        return self.registry("refiners")

    def trackers(self) -> ComponentRegistry:
        """Registered experiment-tracker factories."""
        return self.registry("trackers")

    def components_by_plugin(self) -> dict[str, dict[str, list[str]]]:
        """Plugin name -> component kind -> names it registers (duplicates included)."""
        result: dict[str, dict[str, list[str]]] = {
            self.get_name(plugin) or "": {} for plugin in self.get_plugins()
        }
        for kind in COMPONENT_KINDS:
            for plugin, name, _factory in self._registrations(kind):
                result.setdefault(plugin, {}).setdefault(kind, []).append(name)
        return result

    def hooks_of(self, plugin_name: str) -> list[str]:
        """Names of the hooks that plugin ``plugin_name`` implements, sorted."""
        plugin = self.get_plugin(plugin_name)
        if plugin is None:
            return []
        return sorted(caller.name for caller in self.get_hookcallers(plugin) or [])

    # ----------------------------------------------------------------------- typed calls

    def add_commands(self, cli: click.Group) -> None:
        """Let every plugin add subcommands to ``cli``."""
        self.hook.register_commands(cli=cli)

    def runtimes(self) -> ComponentRegistry:
        """Registered inference runtimes."""
        return self.registry("runtimes")

    def engines(self) -> ComponentRegistry:
        """Registered batch engines of assess and predict (``local``, ``ray``)."""
        return self.registry("engines")

    def calibrators(self) -> ComponentRegistry:
        """Registered quality calibrators (``isotonic``, ``linear``)."""
        return self.registry("calibrators")

    def model_kinds(self) -> ComponentRegistry:
        """Registered model-card loaders, by model kind (``onnx``, ``torch``...)."""
        return self.registry("model_kinds")

    def model_registries(self) -> ComponentRegistry:
        """Registered model-registry backends."""
        return self.registry("model_registries")

    def emit(self, event: Event) -> int:
        """Broadcast ``event`` to its hook, ``on_<event.kind>``; returns how many subscribers
        raised (see :meth:`call_each`)."""
        return self.call_each(f"on_{event.kind}", event=event)

    def service_started(self, service: ServiceInfo) -> None:
        """Broadcast ``on_service_started``."""
        self.call_each("on_service_started", service=service)

    def service_stopped(self, service: ServiceInfo) -> None:
        """Broadcast ``on_service_stopped``."""
        self.call_each("on_service_stopped", service=service)

    def call_each(self, hook_name: str, **kwargs: Any) -> int:
        """Call every implementation of event hook ``hook_name`` with ``kwargs``.

        Each subscriber is called on its own: one that raises is logged with its plugin's name
        and the others still run, so a subscriber can never break the work it reports on.
        Returns how many subscribers raised.
        """
        failures = 0
        for impl in reversed(getattr(self.hook, hook_name).get_hookimpls()):
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception:
                failures += 1
                logger.exception("plugin %r failed in %s", impl.plugin_name, hook_name)
        return failures


def make_plugin_manager(
    *, load_entrypoints: bool = True, builtins: bool = True
) -> QcloopPluginManager:
    """A new plugin manager with the built-in and the allowed entry-point plugins registered.

    Raises:
        pluggy.PluginValidationError: a plugin implements a hook that does not exist.
        PluginLoadError: an entry-point plugin fails to import.
    """
    pm = QcloopPluginManager()
    if builtins:
        pm.load_builtins()
    if load_entrypoints:
        pm.load_entrypoint_plugins()
    pm.check_pending()
    return pm


@functools.cache
def get_plugin_manager() -> QcloopPluginManager:
    """The process-wide plugin manager used by the command line (built once, on first use)."""
    return make_plugin_manager()


def apply_plugin_settings(cfg: Any, pm: QcloopPluginManager | None = None) -> QcloopPluginManager:
    """Block the plugins a configuration's ``plugins.block`` names (in ``pm``, by default the
    process-wide manager); returns the manager. Blocking is for the life of the manager."""
    pm = pm if pm is not None else get_plugin_manager()
    for name in getattr(getattr(cfg, "plugins", None), "block", None) or ():
        if not pm.is_blocked(name):
            logger.info("plugin %s blocked by the configuration", name)
            pm.set_blocked(name)
    return pm


def reset_plugin_manager() -> None:
    """Forget the cached plugin manager, so the next :func:`get_plugin_manager` builds anew."""
    get_plugin_manager.cache_clear()
