"""The plugin manager and the component registries it builds.

Built-in plugins are the modules in :data:`DEFAULT_PLUGINS`; third-party plugins arrive through
the entry-point group ``qcloop``. Two environment variables control the third-party ones:

* ``QCLOOP_LOAD_PLUGINS``: comma-separated allow-list of plugin (entry-point) or distribution
  names; set but empty means none.
* ``QCLOOP_DISABLE_PLUGIN_AUTOLOAD``: any non-empty value loads no entry-point plugin at all.
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

__all__ = [
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
    "get_plugin_manager",
    "make_plugin_manager",
    "reset_plugin_manager",
]

logger = logging.getLogger(__name__)

#: Project name of the hook markers, and the entry-point group third-party plugins use.
ENTRY_POINT_GROUP = "qcloop"
LOAD_PLUGINS_ENV = "QCLOOP_LOAD_PLUGINS"
DISABLE_AUTOLOAD_ENV = "QCLOOP_DISABLE_PLUGIN_AUTOLOAD"

#: Built-in plugins, registered under their module path; a module not (yet) present is skipped.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "qcloop.segmenters.plugin",
    "qcloop.qc_modules.plugin",
    "qcloop.plugins.thresholds",
    "qcloop.plugins.refiners",
    "qcloop.plugins.mlflow.tracker",
    "qcloop.plugins.prometheus.exporter",
)

#: Component kind -> (registering hook, singular noun used in messages).
COMPONENT_KINDS: dict[str, tuple[str, str]] = {
    "segmenters": ("register_segmenters", "segmenter"),
    "qc_modules": ("register_qc_modules", "QC module"),
    "threshold_strategies": ("register_threshold_strategies", "threshold strategy"),
    "refiners": ("register_refiners", "refiner"),
    "trackers": ("register_trackers", "tracker"),
}


class DuplicateComponentError(ValueError):
    """Two registrations of one component name within one kind."""


class UnknownComponentError(KeyError):
    """A component name that no plugin registered."""

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

    def notify_case_scored(self, record: dict[str, Any]) -> None:
        """Broadcast ``on_case_scored``."""
        self.hook.on_case_scored(record=record)

    def notify_drift_alert(self, alert: dict[str, Any]) -> None:
        """Broadcast ``on_drift_alert``."""
        self.hook.on_drift_alert(alert=alert)

    def notify_model_refined(self, view: str, run_dir: str, summary: dict[str, Any]) -> None:
        """Broadcast ``on_model_refined``."""
        self.hook.on_model_refined(view=view, run_dir=run_dir, summary=summary)

    def notify_model_version_registered(
        self, name: str, version: str, tags: dict[str, str]
    ) -> None:
        """Broadcast ``on_model_version_registered``."""
        self.hook.on_model_version_registered(name=name, version=version, tags=tags)

    def notify_model_version_promoted(
        self, name: str, version: str, alias: str, previous_version: str | None
    ) -> None:
        """Broadcast ``on_model_version_promoted``."""
        self.hook.on_model_version_promoted(
            name=name, version=version, alias=alias, previous_version=previous_version
        )


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


def reset_plugin_manager() -> None:
    """Forget the cached plugin manager, so the next :func:`get_plugin_manager` builds anew."""
    get_plugin_manager.cache_clear()
