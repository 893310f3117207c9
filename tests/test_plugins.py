"""The plugin manager: built-ins, registries, duplicates, entry points, environment switches, CLI."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest
from click.testing import CliRunner

from qcloop.monitor import hookimpl
from qcloop.monitor.cli.main import cli
from qcloop.monitor.core import plugin_manager as plugins_module
from qcloop.monitor.core.plugin_manager import (
    DuplicateComponentError,
    PluginLoadError,
    UnknownComponentError,
    get_plugin_manager,
    make_plugin_manager,
    reset_plugin_manager,
)

FAKE_PLUGIN_SOURCE = """
from qcloop.monitor import hookimpl


class FakeNet:
    def __init__(self, **params):
        self.params = params


@hookimpl
def register_segmenters(register):
    register("fake-net", FakeNet)
"""

InstallPlugin = Callable[..., str]


@pytest.fixture
def install_plugin(tmp_path: Path, plugin_env: pytest.MonkeyPatch) -> Iterator[InstallPlugin]:
    """Install a throw-away distribution with one ``qcloop`` entry point into ``tmp_path``."""
    modules: list[str] = []

    def install(
        source: str = FAKE_PLUGIN_SOURCE,
        *,
        ep_name: str = "fakeplug",
        dist_name: str = "qcloop-fake",
    ) -> str:
        module = f"qcloop_fake_{uuid.uuid4().hex[:8]}"
        site = tmp_path / f"site-{module}"
        site.mkdir()
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist_name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[qcloop]\n{ep_name} = {module}\n")
        plugin_env.syspath_prepend(str(site))
        modules.append(module)
        return module

    yield install
    for module in modules:
        sys.modules.pop(module, None)


def _bare_pm() -> plugins_module.QcloopPluginManager:
    return make_plugin_manager(load_entrypoints=False, builtins=False)


class _Recorder:
    def __init__(self, **params: Any) -> None:
        self.params = params


# --------------------------------------------------------------------------- built-ins


def test_builtins_register_segmenters_and_qc_module() -> None:
    pm = make_plugin_manager(load_entrypoints=False)
    segmenters = pm.segmenters()
    assert {"bn1", "bn2"} <= set(segmenters)
    assert segmenters.plugin_of("bn1") == "qcloop.segmenters.plugin"
    assert segmenters.plugin_of("bn2") == "qcloop.segmenters.plugin"
    qc = pm.qc_modules()
    assert "autoencoder" in qc
    assert qc.plugin_of("autoencoder") == "qcloop.qc_modules.plugin"
    assert callable(qc["autoencoder"].factory)


def test_no_builtins_means_empty_registries() -> None:
    pm = _bare_pm()
    for registry in (
        pm.segmenters(),
        pm.qc_modules(),
        pm.threshold_strategies(),
        pm.refiners(),
        pm.trackers(),
    ):
        assert len(registry) == 0


def test_missing_builtin_module_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        plugins_module,
        "DEFAULT_PLUGINS",
        ("qcloop.segmenters.plugin", "qcloop.plugins.no_such_plugin_module"),
    )
    pm = make_plugin_manager(load_entrypoints=False)
    assert pm.has_plugin("qcloop.segmenters.plugin")
    assert not pm.has_plugin("qcloop.plugins.no_such_plugin_module")


def test_builtin_with_a_missing_dependency_propagates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"qcloop_broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text("import qcloop_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins_module, "DEFAULT_PLUGINS", (module,))
    with pytest.raises(ModuleNotFoundError, match="qcloop_dependency_that_is_not_installed"):
        make_plugin_manager(load_entrypoints=False)
    sys.modules.pop(module, None)


# --------------------------------------------------------------------------- registries


def test_create_passes_params_and_unknown_name_lists_available() -> None:
    class Plugin:
        @hookimpl
        def register_refiners(self, register: Any) -> None:
            register("beta", _Recorder)
            register("alpha", _Recorder)

    pm = _bare_pm()
    pm.register(Plugin(), name="my-refiners")
    registry = pm.refiners()
    built = registry.create("beta", {"k": 3, "mode": "x"})
    assert isinstance(built, _Recorder)
    assert built.params == {"k": 3, "mode": "x"}
    assert registry.create("alpha").params == {}
    assert registry.names() == ["alpha", "beta"]
    with pytest.raises(UnknownComponentError) as info:
        registry.create("gamma", {})
    assert str(info.value) == "unknown refiner 'gamma' (available: alpha, beta)"
    assert "gamma" not in registry


def test_duplicate_component_names_both_plugins() -> None:
    class First:
        @hookimpl
        def register_trackers(self, register: Any) -> None:
            register("shared", _Recorder)

    class Second:
        @hookimpl
        def register_trackers(self, register: Any) -> None:
            register("shared", _Recorder)

    pm = _bare_pm()
    pm.register(First(), name="plugin-one")
    pm.register(Second(), name="plugin-two")
    with pytest.raises(DuplicateComponentError) as info:
        pm.trackers()
    message = str(info.value)
    assert "'shared'" in message
    assert "plugin-one" in message
    assert "plugin-two" in message
    # The listing still shows both, so the clash can be diagnosed.
    by_plugin = pm.components_by_plugin()
    assert by_plugin["plugin-one"] == {"trackers": ["shared"]}
    assert by_plugin["plugin-two"] == {"trackers": ["shared"]}


def test_same_name_in_two_kinds_is_not_a_duplicate() -> None:
    class Plugin:
        @hookimpl
        def register_segmenters(self, register: Any) -> None:
            register("same", _Recorder)

        @hookimpl
        def register_qc_modules(self, register: Any) -> None:
            register("same", _Recorder)

    pm = _bare_pm()
    pm.register(Plugin(), name="p")
    assert pm.segmenters().names() == ["same"]
    assert pm.qc_modules().names() == ["same"]


def test_register_refuses_a_non_callable_factory() -> None:
    class Plugin:
        @hookimpl
        def register_segmenters(self, register: Any) -> None:
            register("broken", "not a factory")

    pm = _bare_pm()
    pm.register(Plugin(), name="bad-plugin")
    with pytest.raises(TypeError, match="bad-plugin"):
        pm.segmenters()


def test_check_pending_catches_a_misspelled_hookimpl() -> None:
    class Misspelled:
        @hookimpl
        def register_segmenter(self, register: Any) -> None:  # missing "s"
            register("x", _Recorder)

    pm = _bare_pm()
    pm.register(Misspelled(), name="typo")
    with pytest.raises(pluggy.PluginValidationError, match="register_segmenter"):
        pm.check_pending()


def test_get_plugin_manager_is_cached_until_reset(plugin_env: pytest.MonkeyPatch) -> None:
    plugin_env.setenv("QCLOOP_DISABLE_PLUGIN_AUTOLOAD", "1")
    first = get_plugin_manager()
    assert get_plugin_manager() is first
    reset_plugin_manager()
    assert get_plugin_manager() is not first


# --------------------------------------------------------------------------- entry points


def test_entry_point_plugin_is_loaded(install_plugin: InstallPlugin) -> None:
    module = install_plugin()
    pm = make_plugin_manager()
    registry = pm.segmenters()
    assert registry.plugin_of("fake-net") == "fakeplug"
    assert {"bn1", "bn2", "fake-net"} <= set(registry)
    assert registry.create("fake-net", {"depth": 2}).params == {"depth": 2}
    assert pm.distributions["fakeplug"] == ("qcloop-fake", "1.0")
    assert pm.get_plugin("fakeplug") is sys.modules[module]
    assert pm.hooks_of("fakeplug") == ["register_segmenters"]


def test_entry_points_skipped_when_not_requested(install_plugin: InstallPlugin) -> None:
    install_plugin()
    assert "fake-net" not in make_plugin_manager(load_entrypoints=False).segmenters()


@pytest.mark.parametrize(
    ("env", "loaded"),
    [
        ({}, True),
        ({"QCLOOP_LOAD_PLUGINS": ""}, False),
        ({"QCLOOP_LOAD_PLUGINS": "some-other-plugin"}, False),
        ({"QCLOOP_LOAD_PLUGINS": "fakeplug"}, True),
        ({"QCLOOP_LOAD_PLUGINS": "other, fakeplug"}, True),
        ({"QCLOOP_LOAD_PLUGINS": "Qcloop_Fake"}, True),  # distribution name, normalised
        ({"QCLOOP_DISABLE_PLUGIN_AUTOLOAD": "1"}, False),
        ({"QCLOOP_DISABLE_PLUGIN_AUTOLOAD": "1", "QCLOOP_LOAD_PLUGINS": "fakeplug"}, False),
        ({"QCLOOP_DISABLE_PLUGIN_AUTOLOAD": ""}, True),
    ],
)
def test_environment_switches(
    install_plugin: InstallPlugin,
    plugin_env: pytest.MonkeyPatch,
    env: dict[str, str],
    loaded: bool,
) -> None:
    install_plugin()
    for key, value in env.items():
        plugin_env.setenv(key, value)
    pm = make_plugin_manager()
    assert pm.has_plugin("fakeplug") is loaded
    assert ("fake-net" in pm.segmenters()) is loaded
    assert "bn1" in pm.segmenters()  # built-ins never depend on the switches


def test_allow_list_name_matching_nothing_is_logged(
    install_plugin: InstallPlugin,
    plugin_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    install_plugin()
    plugin_env.setenv("QCLOOP_LOAD_PLUGINS", "fakeplug,not-installed")
    with caplog.at_level(logging.WARNING, logger="qcloop.monitor.core.plugin_manager"):
        pm = make_plugin_manager()
    assert pm.has_plugin("fakeplug")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'not-installed'" in warnings[0]


def test_misspelled_hook_in_entry_point_plugin_fails_loading(
    install_plugin: InstallPlugin,
) -> None:
    install_plugin(
        "from qcloop.monitor import hookimpl\n\n"
        "@hookimpl\ndef register_segmentors(register):\n    pass\n"
    )
    with pytest.raises(pluggy.PluginValidationError, match="register_segmentors"):
        make_plugin_manager()


def test_entry_point_plugin_that_fails_to_import(install_plugin: InstallPlugin) -> None:
    install_plugin("raise RuntimeError('boom at import')\n", ep_name="exploding")
    with pytest.raises(PluginLoadError, match="exploding") as info:
        make_plugin_manager()
    assert "boom at import" in str(info.value)
    assert "QCLOOP_DISABLE_PLUGIN_AUTOLOAD" in str(info.value)


# --------------------------------------------------------------------------- command line


def test_plugins_command_json_lists_the_entry_point_plugin(
    install_plugin: InstallPlugin, plugin_env: pytest.MonkeyPatch
) -> None:
    install_plugin()
    plugin_env.setenv("QCLOOP_LOAD_PLUGINS", "fakeplug")  # other installed plugins stay out
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert listed == [
        {
            "name": "fakeplug",
            "builtin": False,
            "distribution": "qcloop-fake",
            "version": "1.0",
            "hooks": ["register_segmenters"],
            "components": {"segmenters": ["fake-net"]},
        }
    ]


def test_plugins_command_table(
    install_plugin: InstallPlugin, plugin_env: pytest.MonkeyPatch
) -> None:
    install_plugin()
    plugin_env.setenv("QCLOOP_LOAD_PLUGINS", "fakeplug")  # other installed plugins stay out
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["PLUGIN", "SOURCE", "HOOKS", "COMPONENTS"]
    assert len(lines) == 2
    assert lines[1].split() == [
        "fakeplug",
        "qcloop-fake",
        "1.0",
        "register_segmenters",
        "segmenters:",
        "fake-net",
    ]


def test_plugins_command_all_lists_builtin_kinds(plugin_env: pytest.MonkeyPatch) -> None:
    plugin_env.setenv("QCLOOP_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "No third-party plugins" in CliRunner().invoke(cli, ["plugins"]).output
    result = CliRunner().invoke(cli, ["plugins", "--all", "--json"])
    assert result.exit_code == 0, result.output
    by_name = {entry["name"]: entry for entry in json.loads(result.output)}
    assert by_name["qcloop.segmenters.plugin"]["builtin"] is True
    assert by_name["qcloop.segmenters.plugin"]["components"] == {"segmenters": ["bn1", "bn2"]}
    assert by_name["qcloop.qc_modules.plugin"]["components"] == {
        "qc_modules": ["autoencoder", "image_autoencoder"]
    }
    table = CliRunner().invoke(cli, ["plugins", "--all"]).output
    assert "segmenters: bn1, bn2" in table
    assert "qc_modules: autoencoder" in table
