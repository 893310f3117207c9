"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcloop.monitor.core.plugin_manager import (
    DISABLE_AUTOLOAD_ENV,
    LOAD_PLUGINS_ENV,
    reset_plugin_manager,
)
from tests.helpers import tiny_run_config


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No plugin environment switches set and no cached plugin manager, before and after."""
    monkeypatch.delenv(LOAD_PLUGINS_ENV, raising=False)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    reset_plugin_manager()
    yield monkeypatch
    reset_plugin_manager()


#: For local iteration only: a folder holding ``data/`` and ``run/`` made by these fixtures (see
#: tests/README.md); when set, the session fixtures below reuse it instead of training (~60 s).
TEST_CACHE_ENV = "QCLOOP_TEST_CACHE"


def _cache(name: str) -> Path | None:
    root = os.environ.get(TEST_CACHE_ENV)
    if not root:
        return None
    path = Path(root) / name
    if not path.exists():
        raise RuntimeError(f"{TEST_CACHE_ENV}={root}: {path} is missing")
    return path


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` phantom cohort (M&Ms-2 layout), written once per test session. Read-only:
    copy it before changing anything."""
    from qcloop.monitor.phantoms import write_cohort

    cached = _cache("data")
    if cached is not None:
        return cached
    root = tmp_path_factory.mktemp("tiny-cohort") / "data"
    write_cohort(root, preset="tiny", seed=0, workers=1)
    return root


@pytest.fixture(scope="session")
def tiny_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder (both views) trained once per session on ``tiny_cohort`` with
    :func:`tests.helpers.tiny_run_config`, through ``qcloop train``. Read-only: copy it
    (``shutil.copytree``) before changing it."""
    from click.testing import CliRunner

    from qcloop.monitor.cli.main import cli
    from qcloop.monitor.core.config import save_config

    cached = _cache("run")
    if cached is not None:
        return cached
    root = tmp_path_factory.mktemp("tiny-run")
    save_config(tiny_run_config(), root / "config.yaml")
    run = root / "run"
    args = ["train", "--data", str(tiny_cohort), "--out", str(run)]
    result = CliRunner().invoke(cli, [*args, "--config", str(root / "config.yaml")])
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one thread for a module (``pytestmark = pytest.mark.usefixtures(...)``): two
    threads slow down several-fold when other processes share the machine's two cores (docs of
    the stack); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_copy(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's ``tiny_run`` for one module to change."""
    dst = tmp_path_factory.mktemp("monitor-run") / "run"
    shutil.copytree(tiny_run, dst)
    return dst


#: The tiny BN2 with its output classes as (background, RV, MYO, LV): a model in another label
#: order, for model cards.
SWAPPED_BN2_SOURCE = """
from qcloop.segmenters.bn2 import BN2UNet


class SwappedBN2(BN2UNet):
    def forward(self, x):
        out = super().forward(x)
        if isinstance(out, (list, tuple)):
            return [o[:, [0, 3, 2, 1]] for o in out]
        return out[:, [0, 3, 2, 1]]
"""


@pytest.fixture(scope="session")
def swapped_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Import path of :data:`SWAPPED_BN2_SOURCE`'s class (a module written onto ``sys.path``)."""
    import sys
    import textwrap
    import uuid

    folder = tmp_path_factory.mktemp("card-nets")
    name = f"qcloop_test_nets_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(textwrap.dedent(SWAPPED_BN2_SOURCE))
    sys.path.insert(0, str(folder))
    yield f"{name}.SwappedBN2"
    sys.path.remove(str(folder))
