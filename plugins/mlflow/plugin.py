"""The MLflow plugin: the ``mlflow`` experiment tracker (``tracking.tracker``) and model
registry (``registry.backend``). Needs the ``mlflow`` extra."""

from __future__ import annotations

from typing import Any

from qcloop.monitor import hookimpl
from qcloop.monitor.core.hookspecs import Register


def _tracker(**params: Any) -> Any:
    from qcloop.plugins.mlflow.tracker import MlflowTracker

    return MlflowTracker(**params)


@hookimpl
def register_trackers(register: Register) -> None:
    """Register the ``mlflow`` tracker."""
    register("mlflow", _tracker)
