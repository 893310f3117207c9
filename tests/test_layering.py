"""The core imports no component folder: built-ins reach it only as plugins, by name.

Every module under ``monitor/`` is parsed; any import of ``qcloop.plugins``,
``qcloop.segmenters``, ``qcloop.qc_modules`` or ``qcloop.deploy`` fails the test, wherever it is
written (module level, inside a function, under ``TYPE_CHECKING``) and however (``import``,
``from ... import``, ``importlib.import_module("...")`` or ``__import__`` with a literal name).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "monitor"
FORBIDDEN = ("qcloop.plugins", "qcloop.segmenters", "qcloop.qc_modules", "qcloop.deploy")
_DYNAMIC = {"import_module", "__import__"}


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def layering_violations(source: str, filename: str = "<string>") -> list[str]:
    """``"file:line: imported name"`` for every component-folder import in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in _DYNAMIC and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
        bad = sorted({n for n in names if _forbidden(n)})
        found += [f"{filename}:{node.lineno}: {n}" for n in bad[:1]]
    return found


def _core_modules() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def test_the_core_imports_no_component_folder() -> None:
    problems = []
    for path in _core_modules():
        problems += layering_violations(path.read_text(), str(path.relative_to(ROOT)))
    assert not problems, "core -> component imports:\n" + "\n".join(problems)


def test_the_check_sees_every_kind_of_import() -> None:
    assert len(_core_modules()) > 30
    for snippet in (
        "import qcloop.plugins.thresholds",
        "from qcloop.deploy import onnx_runtime",
        "from qcloop.qc_modules.autoencoder import ConvAutoencoder",
        "def f():\n    from qcloop.segmenters.bn1 import BN1\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qcloop.plugins import refiners\n",
        "import importlib\nimportlib.import_module('qcloop.deploy.serve')\n",
        "__import__('qcloop.plugins.prometheus.exporter')\n",
    ):
        assert layering_violations(snippet), snippet
    for fine in (
        "from qcloop.monitor.core import atomic",
        "import qcloop.monitor",
        "DEFAULT = ('qcloop.plugins.thresholds',)",  # a name to load, not an import
    ):
        assert not layering_violations(fine), fine


#: Layers inside the core: a module imports only from its own layer or those below it.
CORE_LAYERS = {
    "core": 0,
    "data": 1,
    "phantoms": 1,
    "method": 2,
    "ops": 3,
    "cli": 4,
    "benchmarks": 4,
}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["qcloop", "monitor"] or len(parts) < 3:
        return None
    return CORE_LAYERS.get(parts[2])


def test_core_layers_import_only_downwards() -> None:
    problems = []
    for path in _core_modules():
        rel = path.relative_to(CORE)
        own = CORE_LAYERS.get(rel.parts[0]) if len(rel.parts) > 1 else None
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                target = _layer(node.module)
                if target is not None and target > own:
                    problems.append(f"monitor/{rel}:{node.lineno}: {node.module}")
    assert not problems, "an inner layer imports an outer one:\n" + "\n".join(problems)


@pytest.mark.parametrize("folder", ["plugins", "segmenters", "qc_modules", "deploy"])
def test_built_ins_are_plugins_loaded_by_name(folder: str) -> None:
    from qcloop.monitor.core.plugin_manager import DEFAULT_PLUGINS

    assert any(name.startswith(f"qcloop.{folder}.") for name in DEFAULT_PLUGINS)
