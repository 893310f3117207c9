"""The MLflow store the tracker and the registry share: its default URI, the client, and the
``mlflow`` extra they need.

``mlflow`` is imported only when a tracker or registry is built, so this plugin loads (and
``qcloop --help`` works) on a base install without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qcloop.monitor.core.optional import require

__all__ = ["default_tracking_uri", "make_client", "require_mlflow"]


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite database in the working folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return env or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def require_mlflow(feature: str) -> None:
    """Raise :class:`~qcloop.monitor.core.optional.MissingExtraError` naming the ``mlflow``
    extra when MLflow is not installed (``feature``: what needs it, for the message)."""
    require("mlflow", "mlflow", feature)


def make_client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri`` for both tracking and the model registry."""
    # run URLs printed to stdout would corrupt the commands' own (--json) output
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    require_mlflow("the MLflow store")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)
