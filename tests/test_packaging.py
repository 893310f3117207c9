"""The distribution maps each top-level folder to a ``qcloop`` subpackage and ships all of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"monitor", "segmenters", "qc_modules", "plugins", "deploy"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed() -> None:
    tool = _pyproject()["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for folder in FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join(("qcloop", folder, *rel)))
    assert found - listed == set(), "package folders missing from pyproject packages"
    assert {tool["package-dir"][f"qcloop.{f}"] for f in FOLDERS} == FOLDERS


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from qcloop.monitor.cli.main import cli\n"
        "r = CliRunner().invoke(cli, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'mlflow', 'monai', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_command_has_help() -> None:
    from click.testing import CliRunner

    from qcloop.monitor.cli.main import cli

    runner = CliRunner()
    ctx = cli.make_context("qcloop", ["--help"], resilient_parsing=True)
    for name in cli.list_commands(ctx):
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output
