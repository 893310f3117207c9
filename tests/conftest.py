"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcloop.monitor.config import QcloopConfig
from qcloop.monitor.plugins import (
    DISABLE_AUTOLOAD_ENV,
    LOAD_PLUGINS_ENV,
    reset_plugin_manager,
)


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No plugin environment switches set and no cached plugin manager, before and after."""
    monkeypatch.delenv(LOAD_PLUGINS_ENV, raising=False)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    reset_plugin_manager()
    yield monkeypatch
    reset_plugin_manager()


def tiny_run_config() -> QcloopConfig:
    """A model set small enough to train in seconds: for tests of what consumes a run (export,
    serving, monitoring, tracking), not of segmentation quality."""
    return QcloopConfig.model_validate(
        {
            "seed": 0,
            "preprocessing": {"size": 64, "target_spacing_mm": 4.0},
            "segmenter": {"name": "bn2", "params": {"base_width": 8, "depth": 4}},
            "training": {
                "epochs": 4,
                "batch_size": 8,
                "m_best": 2,
                "max_slices_per_epoch": 64,
                "min_steps": 300,
            },
            "qc": {
                "module": {
                    "name": "autoencoder",
                    "params": {
                        "width_scale": 0.25,
                        "latent_channels": 32,
                        "dropout": 0.1,
                        "lr": 2e-3,
                    },
                },
                "epochs": 30,
                "batch_size": 8,
                "min_steps": 150,
            },
            "refinement": {
                "refiner": {"name": "alpha", "params": {"max_slices_per_epoch": 16}},
                "k_semi": 1,
            },
        }
    )


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
    :func:`tiny_run_config`. Read-only: copy it (``shutil.copytree``) before changing it."""
    from qcloop.monitor.pipeline import train_run

    cached = _cache("run")
    if cached is not None:
        return cached
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    train_run(tiny_cohort, run, tiny_run_config())
    return run
