"""The hooks of the ``tent`` plugin (entry point ``tent`` in the group ``qcloop``).

Components, chosen by name in a configuration:

* refiner ``tent`` (:class:`~qcloop_tent.refiner.TentRefiner`), under ``refinement.refiner``;
* threshold strategy ``conformal`` (:class:`~qcloop_tent.conformal.ConformalThresholds`),
  under ``assessment.thresholds``.

Events: every event hook writes the event as one JSON line
(:class:`~qcloop_tent.exporter.JsonlEventLog`), when asked to (see that module).
"""

from __future__ import annotations

from qcloop.monitor import (
    AdmissionChanged,
    CaseFailed,
    CaseScored,
    DriftAlert,
    FeedbackReceived,
    ModelRefined,
    ModelsLoaded,
    ModelVersionPromoted,
    ModelVersionRegistered,
    ServiceInfo,
    WindowChanged,
    hookimpl,
)
from qcloop.monitor.core.hookspecs import Register

from qcloop_tent.conformal import ConformalThresholds
from qcloop_tent.exporter import JsonlEventLog
from qcloop_tent.refiner import TentRefiner

#: The process's event log: routes each event to its JSON Lines file.
EVENT_LOG = JsonlEventLog()


@hookimpl
def register_refiners(register: Register) -> None:
    """Register the ``tent`` refiner."""
    register("tent", TentRefiner)


@hookimpl
def register_threshold_strategies(register: Register) -> None:
    """Register the ``conformal`` threshold strategy."""
    register("conformal", ConformalThresholds)


@hookimpl
def on_service_started(service: ServiceInfo) -> None:
    """Route the service's events to its file and log its start."""
    EVENT_LOG.service_started(service)


@hookimpl
def on_service_stopped(service: ServiceInfo) -> None:
    """Log the service's stop."""
    EVENT_LOG.service_stopped(service)


@hookimpl
def on_case_scored(event: CaseScored) -> None:
    """Log a scored case."""
    EVENT_LOG.write(event)


@hookimpl
def on_case_failed(event: CaseFailed) -> None:
    """Log a case that could not be scored."""
    EVENT_LOG.write(event)


@hookimpl
def on_window_changed(event: WindowChanged) -> None:
    """Log a rolling window's new statistics."""
    EVENT_LOG.write(event)


@hookimpl
def on_drift_alert(event: DriftAlert) -> None:
    """Log a drift alert."""
    EVENT_LOG.write(event)


@hookimpl
def on_feedback_received(event: FeedbackReceived) -> None:
    """Log a corrected case's realised and estimated scores."""
    EVENT_LOG.write(event)


@hookimpl
def on_model_refined(event: ModelRefined) -> None:
    """Log a refinement."""
    EVENT_LOG.write(event)


@hookimpl
def on_model_version_registered(event: ModelVersionRegistered) -> None:
    """Log a registered model version."""
    EVENT_LOG.write(event)


@hookimpl
def on_model_version_promoted(event: ModelVersionPromoted) -> None:
    """Log an alias move."""
    EVENT_LOG.write(event)


@hookimpl
def on_models_loaded(event: ModelsLoaded) -> None:
    """Log a model load or swap."""
    EVENT_LOG.write(event)


@hookimpl
def on_admission_changed(event: AdmissionChanged) -> None:
    """Log a change of a service's work queue."""
    EVENT_LOG.write(event)
