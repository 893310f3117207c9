"""The ``mlflow`` tracker: qcloop runs, params, per-epoch metrics and artifacts in MLflow.

Configured as ``tracking: {tracker: {name: mlflow, params: {tracking_uri: ..., experiment:
...}}}``. The tracking URI comes from ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a
SQLite database in the working folder (``sqlite:///<cwd>/mlflow.db``: offline, no server).
Needs the ``mlflow`` extra (``pip install 'qcloop[mlflow]'``).

The tracker talks to MLflow through an ``MlflowClient`` (never the fluent, process-global
``mlflow.start_run`` state): a run started while another is open becomes its nested child.
Only run-folder files are logged as artifacts (weights are plain state dicts); no model pickle.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qcloop.plugins.mlflow.store import default_tracking_uri, make_client, require_mlflow

log = logging.getLogger(__name__)

#: MLflow's limits: value length of a param, items per ``log_batch`` call.
MAX_PARAM_LENGTH = 6000
BATCH_SIZE = 100


class TrackingError(RuntimeError):
    """The tracking server or database cannot be used, or a call came outside a run."""


def metric_key(name: str) -> str:
    """``name`` with the characters MLflow refuses in metric and param keys replaced by ``_``
    (``M+QC`` -> ``M_QC``)."""
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", str(name)) or "_"


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys with string values (lists as JSON-like text)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            text = str(value)
            out[name] = (
                text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
            )
    return out


class MlflowTracker:
    """A :class:`~qcloop.monitor.core.interfaces.Tracker` backed by an MLflow tracking store.

    Args:
        tracking_uri: any MLflow tracking URI; default MLFLOW_TRACKING_URI, else
            ``sqlite:///<cwd>/mlflow.db``.
        experiment: experiment name (created on first use).
        tags: tags set on every run this tracker starts.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "qcloop",
        tags: Mapping[str, str] | None = None,
    ) -> None:
        require_mlflow("the MLflow tracker")
        if not isinstance(experiment, str) or not experiment.strip():
            raise ValueError("tracking.tracker.params.experiment must be a non-empty string")
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self._client: Any = None
        self._experiment_id: str | None = None
        self._stack: list[str] = []

    def __repr__(self) -> str:
        return f"MlflowTracker(tracking_uri={self.tracking_uri!r}, experiment={self.experiment!r})"

    # ------------------------------------------------------------------ client

    @property
    def client(self) -> Any:
        """The ``MlflowClient`` (built on first use)."""
        if self._client is None:
            self._client = make_client(self.tracking_uri)
        return self._client

    def experiment_id(self) -> str:
        """Id of the tracker's experiment, created when missing."""
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            try:
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    try:
                        self._experiment_id = self.client.create_experiment(self.experiment)
                    except MlflowException:  # created meanwhile by another process
                        exp = self.client.get_experiment_by_name(self.experiment)
                        if exp is None:
                            raise
                if exp is not None:
                    self._experiment_id = exp.experiment_id
            except MlflowException as exc:
                raise TrackingError(
                    f"MLflow tracking store {self.tracking_uri}: cannot open experiment "
                    f"{self.experiment!r} ({exc})"
                ) from exc
        assert self._experiment_id is not None
        return self._experiment_id

    @property
    def run_id(self) -> str | None:
        """Id of the innermost open run, or None outside a run."""
        return self._stack[-1] if self._stack else None

    def _active(self) -> str:
        if not self._stack:
            raise TrackingError("no MLflow run is open: call inside 'with tracker.start_run(...)'")
        return self._stack[-1]

    # ------------------------------------------------------------------ Tracker protocol

    @contextlib.contextmanager
    def start_run(self, name: str, tags: dict[str, str] | None = None) -> Iterator[str]:
        """Open a run (nested under the open one, if any); yields its id. The run ends FINISHED,
        or FAILED (KILLED on Ctrl-C) when the block raises."""
        all_tags = {**self.tags, **{str(k): str(v) for k, v in (tags or {}).items()}}
        if self._stack:
            all_tags["mlflow.parentRunId"] = self._stack[-1]
        run = self.client.create_run(self.experiment_id(), run_name=name, tags=all_tags)
        run_id = run.info.run_id
        self._stack.append(run_id)
        status = "FINISHED"
        try:
            yield run_id
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._stack.pop()
            self.client.set_terminated(run_id, status)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (nested dicts as dotted keys); MLflow params cannot change once logged."""
        from mlflow.entities import Param

        items = [Param(metric_key(k), v) for k, v in flatten_params(params).items()]
        run_id = self._active()
        for i in range(0, len(items), BATCH_SIZE):
            self.client.log_batch(run_id, params=items[i : i + BATCH_SIZE])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics at ``step``; non-finite values are skipped with a warning."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(float(value)):
                log.warning("metric %s = %s is not finite; not logged", key, value)
                continue
            items.append(Metric(metric_key(key), float(value), now, int(step or 0)))
        run_id = self._active()
        for i in range(0, len(items), BATCH_SIZE):
            self.client.log_batch(run_id, metrics=items[i : i + BATCH_SIZE])

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Log a file (or every file of a folder) under ``artifact_path``."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: artifact to log does not exist")
        if p.is_dir():
            self.client.log_artifacts(self._active(), str(p), artifact_path)
        else:
            self.client.log_artifact(self._active(), str(p), artifact_path)

    def log_artifacts(self, path: str, artifact_path: str | None = None) -> None:
        """Log every file under folder ``path``."""
        self.log_artifact(path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags on the open run."""
        from mlflow.entities import RunTag

        items = [RunTag(metric_key(k), str(v)) for k, v in tags.items()]
        run_id = self._active()
        for i in range(0, len(items), BATCH_SIZE):
            self.client.log_batch(run_id, tags=items[i : i + BATCH_SIZE])
