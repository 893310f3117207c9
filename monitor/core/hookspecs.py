"""Hook specifications: the whole plugin contract of qcloop.

Two kinds of hooks:

* **Component hooks** (register-callback style): a plugin calls ``register(name, factory)`` once
  per component it provides. The core resolves components by name from the configuration once,
  then calls them as plain objects, so per-case work never goes through pluggy.
* **Event hooks** (broadcast, no return value): automation, trackers and exporters subscribe to
  what happens in the loop. Each receives one typed event from :mod:`qcloop.monitor.core.events`.

Every hook here is documented with its exact signature in ``docs/plugin-hooks.md``;
``tests/test_docs.py`` fails when the two disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

    from qcloop.monitor.core.events import (
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
    )

hookspec = pluggy.HookspecMarker("qcloop")

#: ``register(name, factory)``: the callback every component hook receives.
Register = Callable[[str, Callable[..., Any]], None]


# --------------------------------------------------------------------------- components


@hookspec
def register_segmenters(register: Register) -> None:
    """Register segmenter factories: ``register("bn1", factory)``.

    :param register: call ``register(name, factory)``; ``factory(**params)`` returns a
        :class:`torch.nn.Module` with one input channel and ``num_classes`` logits out.
    """


@hookspec
def register_qc_modules(register: Register) -> None:
    """Register QC-module factories: ``register("autoencoder", factory)``.

    :param register: call ``register(name, factory)``; ``factory(**params)`` returns an object
        with ``fit(masks)`` and ``reconstruct(probabilities)``; one that sets ``needs_image``
        also receives the prepared slices (``images=`` / ``image=``, see ``QCModule``).
    """


@hookspec
def register_threshold_strategies(register: Register) -> None:
    """Register threshold-strategy factories: ``register("iqr", factory)``.

    :param register: call ``register(name, factory)``; ``factory(**params)`` returns a stateless
        strategy whose ``fit(pdc, phd, penalised)`` returns fences with ``is_outlier(pdc, phd)``
        and ``to_dict()``, and whose ``fences_from_dict(data)`` reads those fences back.
    """


@hookspec
def register_refiners(register: Register) -> None:
    """Register refiner factories: ``register("alpha", factory)``.

    :param register: call ``register(name, factory)``; ``factory(seed=..., **params)`` returns
        an object whose ``refine(model, qc, flagged, labeled, still_ood)`` fine-tunes one
        candidate in place and returns its history.
    """


@hookspec
def register_runtimes(register: Register) -> None:
    """Register inference runtimes: ``register("onnxruntime", factory)``.

    :param register: call ``register(name, factory)``; ``factory(run_dir, view, cfg, **params)``
        returns a ``Runtime`` running that view's candidates and QC module.
    """


@hookspec
def register_engines(register: Register) -> None:
    """Register batch engines for ``assess``, ``predict`` and ``calibrate``:
    ``register("ray", factory)``.

    :param register: call ``register(name, factory)``; ``factory(**params)`` returns an
        :class:`~qcloop.monitor.core.interfaces.Engine` (``--engine NAME`` picks it; ``params``
        are the command's ``--address``, ``--workers``, ``--num-gpus-per-worker`` and
        ``--batch-size``).
    """


@hookspec
def register_calibrators(register: Register) -> None:
    """Register quality calibrators (``est_dice``, ``est_hd_mm``): ``register("isotonic",
    factory)``.

    :param register: call ``register(name, factory)``; ``factory(**params)`` returns a
        :class:`~qcloop.monitor.core.interfaces.QualityCalibrator` (``qcloop fit-estimator
        --calibrator NAME`` picks it).
    """


@hookspec
def register_model_kinds(register: Register) -> None:
    """Register model-card loaders per model kind: ``register("onnx", loader)``.

    :param register: call ``register(kind, loader)``; ``loader(card)`` takes a validated
        :class:`~qcloop.monitor.core.model_card.ModelCard` of that ``kind`` and returns an
        ``ExternalModel`` (``predict(batch)``, ``providers()``). Raise ``ModelCardError``
        naming the field at fault, or ``MissingExtraError`` naming the extra to install.
    """


@hookspec
def register_model_registries(register: Register) -> None:
    """Register model-registry backends: ``register("mlflow", factory)``.

    :param register: call ``register(name, factory)``; ``factory(uri=None, cache_dir=None,
        **params)`` returns a ``ModelRegistry`` (versions, aliases, local copies).
    """


@hookspec
def register_trackers(register: Register) -> None:
    """Register experiment-tracker factories: ``register("mlflow", factory)``.

    :param register: call ``register(name, factory)``; ``factory(**params)`` returns a tracker
        (runs, params, metrics, artifacts).
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``qcloop`` command line.

    :param cli: the root :class:`click.Group`; call ``cli.add_command(...)``.
    """


# --------------------------------------------------------------------------- events


@hookspec
def on_service_started(service: ServiceInfo) -> None:
    """A service (``qcloop monitor`` or ``qcloop serve``) is starting.

    :param service: its kind, configuration, ASGI app (still open to new routes and
        middleware) and id; record opened endpoints in ``service.endpoints``.
    """


@hookspec
def on_service_stopped(service: ServiceInfo) -> None:
    """A service stopped: release what ``on_service_started`` opened for it.

    :param service: the same object ``on_service_started`` received.
    """


@hookspec
def on_case_scored(event: CaseScored) -> None:
    """A case was scored by the QC module.

    :param event: the case's JSON record and the emitting service.
    """


@hookspec
def on_case_failed(event: CaseFailed) -> None:
    """A case could not be scored (unreadable, invalid, or a failure while scoring it).

    :param event: the stage, the reason, the input's name and the emitting service.
    """


@hookspec
def on_window_changed(event: WindowChanged) -> None:
    """A view's rolling window changed (a case entered it, or it was reset or restored).

    :param event: the view, the window's statistics and the reference median pDC.
    """


@hookspec
def on_drift_alert(event: DriftAlert) -> None:
    """A drift alert was raised (by the monitor's own policy or received from Alertmanager).

    :param event: what fired, the window it covers and the values against their limits.
    """


@hookspec
def on_feedback_received(event: FeedbackReceived) -> None:
    """Late ground truth: a corrected mask was matched to a scored case.

    :param event: the case, its realised and estimated scores per structure, its flag and
        whether it failed.
    """


@hookspec
def on_model_refined(event: ModelRefined) -> None:
    """A refiner produced a new model set.

    :param event: the view, the refined run folder and the refinement's summary.
    """


@hookspec
def on_model_version_registered(event: ModelVersionRegistered) -> None:
    """A model version was registered in the model registry.

    :param event: registered model name, version and lineage tags.
    """


@hookspec
def on_model_version_promoted(event: ModelVersionPromoted) -> None:
    """An alias (``champion``/``challenger``) was moved to a model version.

    :param event: model name, the version the alias now points at, the alias and the version
        it pointed at before.
    """


@hookspec
def on_models_loaded(event: ModelsLoaded) -> None:
    """A service loaded its models (at start, or swapped them when the champion moved).

    :param event: per view the model name, version and runtime; the outcome.
    """


@hookspec
def on_admission_changed(event: AdmissionChanged) -> None:
    """A service's work queue changed (a request admitted, started, finished or refused).

    :param event: requests running and waiting, and whether one was refused.
    """
