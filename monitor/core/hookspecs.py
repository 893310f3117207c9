"""Hook specifications: the whole plugin contract of qcloop.

Two kinds of hooks:

* **Component hooks** (register-callback style): a plugin calls ``register(name, factory)`` once
  per component it provides. The core resolves components by name from the configuration once,
  then calls them as plain objects, so per-case work never goes through pluggy.
* **Event hooks** (broadcast, no return value): automation, trackers and exporters subscribe to
  what happens in the loop.

Every hook here is documented with its exact signature in ``docs/plugin-hooks.md``;
``tests/test_docs.py`` fails when the two disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

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
        with ``fit(masks)`` and ``reconstruct(probabilities)``.
    """


@hookspec
def register_threshold_strategies(register: Register) -> None:
    """Register threshold-strategy factories: ``register("iqr", factory)``.

    :param register: call ``register(name, factory)``; ``factory(**params)`` returns a stateless
        strategy whose ``fit(pdc, phd, penalised)`` returns fences with ``is_outlier(pdc, phd)``.
    """


@hookspec
def register_refiners(register: Register) -> None:
    """Register refiner factories: ``register("alpha", factory)``.

    :param register: call ``register(name, factory)``; ``factory(**params)`` returns an object
        whose ``refine(model, qc, flagged, labeled, still_ood)`` fine-tunes one candidate in
        place and returns its history.
    """


@hookspec
def register_trackers(register: Register) -> None:
    """Register experiment-tracker factories: ``register("mlflow", factory)``.

    :param register: call ``register(name, factory)``; ``factory(**params)`` returns a tracker
        (runs, params, metrics, artifacts, model versions).
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``qcloop`` command line.

    :param cli: the root :class:`click.Group`; call ``cli.add_command(...)``.
    """


# --------------------------------------------------------------------------- events


@hookspec
def on_case_scored(record: dict[str, Any]) -> None:
    """A case was scored by the QC module (one JSON-serialisable QC record).

    :param record: the per-case record as written to the JSONL stream (subject, view, phase,
        per-candidate pseudo-metrics per structure, fences, OoD flag, selected candidate).
    """


@hookspec
def on_drift_alert(alert: dict[str, Any]) -> None:
    """A drift alert was raised (by the monitor's own policy or received from Alertmanager).

    :param alert: what fired, the window it covers and the values against their limits.
    """


@hookspec
def on_model_refined(view: str, run_dir: str, summary: dict[str, Any]) -> None:
    """A refiner produced a new candidate set.

    :param view: ``"SA"`` or ``"LA"``.
    :param run_dir: folder holding the refined model set.
    :param summary: epochs run, OoD counts before and after, losses.
    """


@hookspec
def on_model_version_registered(name: str, version: str, tags: dict[str, str]) -> None:
    """A model version was registered (for example in the MLflow registry).

    :param name: registered model name.
    :param version: the new version.
    :param tags: lineage tags (parent version, triggering window, OoD counts).
    """


@hookspec
def on_model_version_promoted(
    name: str, version: str, alias: str, previous_version: str | None
) -> None:
    """An alias (``champion``/``challenger``) was moved to a model version.

    :param name: registered model name.
    :param version: the version the alias now points at.
    :param alias: the alias that moved.
    :param previous_version: the version it pointed at before, if any.
    """
