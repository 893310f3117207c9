"""The core's model lifecycle and promotion gate need nothing MLflow-specific: a second,
dict-backed ``ModelRegistry`` registered by a test plugin (with MLflow blocked and not even
importable) carries ensure_champion, register_and_gate with automatic promotion, promote,
rollback, the ``qcloop models`` commands and the registered/promoted events."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from qcloop.monitor import hookimpl
from qcloop.monitor.cli.main import cli
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.events import ModelVersionPromoted, ModelVersionRegistered
from qcloop.monitor.core.interfaces import AliasMove, ModelRef, ModelRegistry
from qcloop.monitor.core.plugin_manager import (
    BLOCK_PLUGINS_ENV,
    get_plugin_manager,
    reset_plugin_manager,
)
from qcloop.monitor.core.resolve import build_model_registry
from qcloop.monitor.ops import promotion
from qcloop.monitor.ops import run_package as pkg
from tests.test_registry import WINDOW, _copy_run, _gate_rule, _window


@dataclass
class _Version:
    folder: Path
    tags: dict[str, str]
    created_ms: int


@dataclass
class MemoryRegistry:
    """A ``ModelRegistry`` in a dict: versions are staged copies under ``root``."""

    root: Path
    models: dict[str, dict[str, _Version]] = field(default_factory=dict)
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)

    def _version(self, name: str, version: str) -> _Version:
        if name not in self.models:
            raise pkg.RegistryError(f"no registered model {name!r}")
        if str(version) not in self.models[name]:
            raise pkg.RegistryError(f"model {name!r} has no version {version!r}")
        return self.models[name][str(version)]

    def _ref(self, name: str, version: str, folder: Path | None = None) -> ModelRef:
        v = self._version(name, version)
        view = pkg.view_of(name, version, v.tags)
        held = sorted(a for a, n in self.aliases.get(name, {}).items() if n == version)
        return ModelRef(name, view, version, folder or v.folder, held, dict(v.tags))

    def register(
        self,
        run_dir: Path,
        *,
        name_prefix: str,
        views: Sequence[str] | None = None,
        tags: Mapping[str, str] | None = None,
        view_tags: Mapping[str, Mapping[str, str]] | None = None,
    ) -> dict[str, ModelRef]:
        info, chosen = pkg.check_registration(run_dir, name_prefix, views)
        refs = {}
        for view in chosen:
            name = pkg.registered_name(name_prefix, view)
            version = str(len(self.models.get(name, {})) + 1)
            folder = self.root / name / version
            digest = pkg.stage(run_dir, view, folder)
            all_tags = {**pkg.package_tags(run_dir, info, view, digest), **dict(tags or {})}
            all_tags.update((view_tags or {}).get(view) or {})
            self.models.setdefault(name, {})[version] = _Version(
                folder, all_tags, int(time.time() * 1000)
            )
            refs[view] = self._ref(name, version, run_dir)
        return refs

    def find(self, run_dir: Path, *, name_prefix: str) -> dict[str, ModelRef]:
        found = {}
        for view in pkg.run_views(run_dir):
            name = pkg.registered_name(name_prefix, view)
            digest = pkg.run_digest(run_dir, view)
            same = [
                n for n, v in self.models.get(name, {}).items() if v.tags[pkg.TAG_DIGEST] == digest
            ]
            if same:
                found[view] = self._ref(name, max(same, key=int), run_dir)
        return found

    def _targets(self, spec: str) -> list[tuple[str, str]]:
        parsed = pkg.parse_spec(spec)
        if parsed.version is not None:
            self._version(parsed.base, parsed.version)
            return [(parsed.base, parsed.version)]
        names = pkg.spec_names(parsed)
        found = [
            (n, self.aliases[n][str(parsed.alias)])
            for n in names
            if str(parsed.alias) in self.aliases.get(n, {})
        ]
        if not found:
            raise pkg.RegistryError(f"model spec {spec!r}: no version carries {parsed.alias!r}")
        return found

    def resolve(self, spec: str) -> dict[str, ModelRef]:
        refs = {}
        for name, version in self._targets(spec):
            ref = self._ref(name, version)
            pkg.verify(ref.run_dir, ref.view, ref.tags[pkg.TAG_DIGEST])
            refs[ref.view] = ref
        return refs

    def alias_versions(self, spec: str) -> dict[str, str]:
        return {self._ref(n, v).view: v for n, v in self._targets(spec)}

    def set_alias(self, name: str, version: str, alias: str) -> AliasMove:
        target = self._version(name, version)
        aliases = self.aliases.setdefault(name, {})
        previous = aliases.get(alias)
        if previous is not None and previous != version:
            aliases[f"{promotion.PREVIOUS}{alias}"] = previous
            target.tags[f"qcloop.previous_{alias}"] = previous
        aliases[alias] = version
        if alias == promotion.CHAMPION and aliases.get(promotion.CHALLENGER) == version:
            del aliases[promotion.CHALLENGER]
        return AliasMove(self._ref(name, version), alias, previous)

    def rollback(self, name: str) -> AliasMove:
        aliases = self.aliases.get(name, {})
        current = aliases.get(promotion.CHAMPION)
        target = aliases.pop(f"{promotion.PREVIOUS}{promotion.CHAMPION}", None)
        if current is None or target is None:
            raise pkg.RegistryError(f"model {name!r}: no previous champion to roll back to")
        aliases[promotion.CHAMPION] = target
        self._version(name, current).tags[promotion.TAG_ROLLED_BACK] = "now"
        before = self._version(name, target).tags.get(promotion.TAG_PREVIOUS_CHAMPION)
        if before and before != target:
            aliases[f"{promotion.PREVIOUS}{promotion.CHAMPION}"] = before
        return AliasMove(self._ref(name, target), promotion.CHAMPION, current)

    def set_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        self._version(name, version).tags.update(tags)

    def get_version(self, name: str, version: str) -> dict[str, Any]:
        ref, v = self._ref(name, version), self._version(name, version)
        gate = json.loads(v.tags[promotion.TAG_GATE]) if promotion.TAG_GATE in v.tags else None
        return {
            "name": name,
            "version": version,
            "aliases": ref.aliases,
            "status": "READY",
            "created_ms": v.created_ms,
            "tags": dict(v.tags),
            "gate": gate,
        }

    def list_versions(self, name_prefix: str | None = None) -> list[dict[str, Any]]:
        rows = [
            self.get_version(name, version)
            for name, versions in self.models.items()
            if name_prefix is None or pkg.prefix_of(name) == name_prefix
            for version in versions
        ]
        return sorted(rows, key=lambda r: (r["name"], -int(r["version"])))


class MemoryPlugin:
    """Registers the ``memory`` registry backend (one store per uri) and records the events."""

    def __init__(self) -> None:
        self.stores: dict[str, MemoryRegistry] = {}
        self.registered: list[tuple[str, str]] = []
        self.promoted: list[tuple[str, str, str, str | None]] = []

    def _make(self, uri: str | None = None, cache_dir: Path | None = None) -> MemoryRegistry:
        assert uri, "the memory registry needs registry.uri (a folder)"
        return self.stores.setdefault(uri, MemoryRegistry(Path(uri)))

    @hookimpl
    def register_model_registries(self, register: Any) -> None:
        register("memory", self._make)

    @hookimpl
    def on_model_version_registered(self, event: ModelVersionRegistered) -> None:
        self.registered.append((event.name, event.version))

    @hookimpl
    def on_model_version_promoted(self, event: ModelVersionPromoted) -> None:
        self.promoted.append((event.name, event.version, event.alias, event.previous_version))


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryPlugin]:
    """A fresh plugin manager with MLflow blocked and unimportable, and the memory plugin."""
    monkeypatch.setenv(BLOCK_PLUGINS_ENV, "qcloop.plugins.mlflow.plugin")
    monkeypatch.setitem(sys.modules, "mlflow", None)
    reset_plugin_manager()
    plugin = MemoryPlugin()
    get_plugin_manager().register(plugin, name="memory-registry")
    assert "mlflow" not in get_plugin_manager().model_registries()
    yield plugin
    reset_plugin_manager()


def _memory_config(base: QcloopConfig, store: Path, promotion_mode: str) -> QcloopConfig:
    registry = base.registry.model_copy(
        update={
            "backend": base.registry.backend.model_copy(update={"name": "memory"}),
            "uri": str(store),
            "name_prefix": "mem",
            "promotion": promotion_mode,
            "dice_margin": 0.05,
        }
    )
    return base.model_copy(update={"registry": registry})


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lifecycle_and_models_commands_through_a_second_backend(
    memory: MemoryPlugin, tiny_run: Path, tmp_path: Path
) -> None:
    cfg = _memory_config(QcloopConfig(), tmp_path / "store", "off")
    registry = build_model_registry(cfg)
    assert isinstance(registry, ModelRegistry) and isinstance(registry, MemoryRegistry)
    assert not isinstance(registry, promotion.GateRecorder)
    run = _copy_run(tiny_run, tmp_path / "run")

    champions = promotion.ensure_champion(registry, run, name_prefix="mem")
    assert {v: (r.version, r.aliases) for v, r in champions.items()} == {
        "SA": ("1", ["champion"]),
        "LA": ("1", ["champion"]),
    }
    assert champions["SA"].run_dir.resolve() == run.resolve()
    assert promotion.ensure_champion(registry, run, name_prefix="mem").keys() == {"SA", "LA"}
    assert sorted(memory.registered) == [("mem-LA", "1"), ("mem-SA", "1")]
    assert sorted(memory.promoted) == [
        ("mem-LA", "1", "champion", None),
        ("mem-SA", "1", "champion", None),
    ]

    # a changed model set, registered under promotion "off": a challenger, no gate, no move
    (run / "SA" / "qc.pt").write_bytes((run / "SA" / "qc.pt").read_bytes() + b"\0")
    result = promotion.register_and_gate(
        registry, run, {"SA": champions["SA"]}, cfg, window_dir=tmp_path, tags={"t": "x"}
    )
    assert result == {"SA": {"name": "mem-SA", "version": "2", "gate": None, "promoted": False}}
    # the same folder again (a restart after registering, before the monitor's ledger knew):
    # the version registered from it is found, not registered a second time
    again = promotion.register_and_gate(
        registry, run, {"SA": champions["SA"]}, cfg, window_dir=tmp_path, tags={"t": "x"}
    )
    assert again == result and memory.registered[-1] == ("mem-SA", "2")
    assert registry.alias_versions("mem-SA@challenger") == {"SA": "2"}
    assert registry.get_version("mem-SA", "2")["tags"][promotion.TAG_PARENT_VERSION] == "1"
    assert memory.registered[-1] == ("mem-SA", "2") and len(memory.promoted) == 2

    config_file = tmp_path / "registry.yaml"
    config_file.write_text(yaml.safe_dump({"registry": cfg.registry.model_dump(mode="json")}))
    args = ["--config", str(config_file)]
    moved = CliRunner().invoke(cli, ["models", "promote", "mem-SA", "2", *args])
    assert moved.exit_code == 0, moved.output
    assert memory.promoted[-1] == ("mem-SA", "2", "champion", "1")
    assert registry.alias_versions("mem@champion") == {"SA": "2", "LA": "1"}
    listed = CliRunner().invoke(cli, ["models", "list", "--prefix", "mem", "--json", *args])
    rows = {(r["name"], r["version"]): r["aliases"] for r in json.loads(listed.output)}
    assert rows[("mem-SA", "2")] == ["champion"] and rows[("mem-SA", "1")] == ["previous-champion"]
    back = CliRunner().invoke(cli, ["models", "rollback", "mem-SA", *args])
    assert back.exit_code == 0 and "rolled back to version 1" in back.output
    assert memory.promoted[-1] == ("mem-SA", "1", "champion", "2")
    again = CliRunner().invoke(cli, ["models", "rollback", "mem-SA", *args])
    assert again.exit_code != 0 and "no previous champion" in again.output


@pytest.mark.slow
def test_a_refined_run_is_gated_and_promoted_automatically_through_a_second_backend(
    memory: MemoryPlugin, tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    from qcloop.monitor.method.refine import refine_run
    from qcloop.monitor.method.run_folder import load_run_config

    run = _copy_run(tiny_run, tmp_path / "run")
    cfg = _memory_config(load_run_config(run), tmp_path / "store", "auto")
    registry = build_model_registry(cfg)
    champions = promotion.ensure_champion(registry, run, name_prefix="mem")
    refined = tmp_path / "refined"
    refine_run(tiny_cohort, run, refined, views=["SA"], where=WINDOW)
    window = _window(tiny_cohort, tmp_path / "window")

    result = promotion.register_and_gate(
        registry, refined, champions, cfg, window_dir=window, tags={"qcloop.trigger": "test"}
    )
    sa = result["SA"]
    assert set(result) == {"SA"} and sa["version"] == "2"
    assert sa["gate"]["passed"] == _gate_rule(sa["gate"]["figures"], 0.05)
    assert sa["gate"]["passed"] and sa["promoted"] is True
    assert memory.registered[-1] == ("mem-SA", "2")
    assert memory.promoted[-1] == ("mem-SA", "2", "champion", "1")
    refs = registry.resolve("mem@champion")
    assert {v: r.version for v, r in refs.items()} == {"SA": "2", "LA": "1"}
    assert _sha(refs["SA"].run_dir / "SA" / "qc.pt") == _sha(refined / "SA" / "qc.pt")
    assert refs["SA"].tags[promotion.TAG_GATE_PASSED] == "true"
    assert refs["SA"].tags["qcloop.trigger"] == "test"

    move = promotion.rollback(registry, "mem-SA")
    assert (move.ref.version, move.previous_version, move.moved) == ("1", "2", True)
    assert memory.promoted[-1] == ("mem-SA", "1", "champion", "2")
    assert registry.alias_versions("mem@champion") == {"SA": "1", "LA": "1"}


def test_a_staged_version_verifies_and_a_changed_copy_does_not(
    tiny_run: Path, tmp_path: Path
) -> None:
    staged = tmp_path / "staged"
    digest = pkg.stage(tiny_run, "SA", staged)
    assert digest == pkg.run_digest(tiny_run, "SA") != pkg.run_digest(tiny_run, "LA")
    manifest = json.loads((staged / pkg.MANIFEST).read_text())
    assert set(manifest["files"]) == set(pkg.model_files(tiny_run, "SA"))
    assert (staged / "run.json").is_file() and not (staged / "LA").exists()
    pkg.verify(staged, "SA", digest)
    with pytest.raises(pkg.RegistryError, match="does not describe the registered LA version"):
        pkg.verify(staged, "LA", digest)
    with pytest.raises(pkg.RegistryError, match="does not describe the registered SA version"):
        pkg.verify(staged, "SA", "0" * 64)
    (staged / "SA" / "qc.pt").write_bytes(b"changed")
    with pytest.raises(pkg.RegistryError, match=r"SA/qc.pt: missing or differs from the"):
        pkg.verify(staged, "SA", digest)
    tags = pkg.package_tags(tiny_run, pkg.read_run_info(tiny_run), "SA", digest)
    assert pkg.recorded_folder(tags, "SA") == tiny_run.resolve()
    assert pkg.recorded_folder({**tags, pkg.TAG_DIGEST: "0" * 64}, "SA") is None
