"""The MLflow plugin: the ``mlflow`` experiment tracker (``tracking.tracker``) and model
registry (``registry.backend``). Both need the ``mlflow`` extra, imported when one is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qcloop.monitor import hookimpl
from qcloop.monitor.core.hookspecs import Register


def _tracker(**params: Any) -> Any:
    from qcloop.plugins.mlflow.tracker import MlflowTracker

    return MlflowTracker(**params)


def _registry(uri: str | None = None, cache_dir: Path | None = None) -> Any:
    from qcloop.plugins.mlflow.registry import MlflowRegistry

    return MlflowRegistry(uri=uri, cache_dir=cache_dir)


@hookimpl
def register_trackers(register: Register) -> None:
    """Register the ``mlflow`` tracker."""
    register("mlflow", _tracker)


@hookimpl
def register_model_registries(register: Register) -> None:
    """Register the ``mlflow`` model registry."""
    register("mlflow", _registry)
