"""qcloop's core, and the plugin API in one import.

A plugin author needs nothing but this module::

    from qcloop.monitor import hookimpl, CaseScored, FlaggedSet, SliceSet

Layout of the core (it imports nothing from ``plugins/``, ``segmenters/``, ``qc_modules/`` or
``deploy/``; ``tests/test_layering.py`` enforces it):

* ``core/``: the plugin contract (hook specifications, plugin manager, interfaces, events), the
  configuration, atomic writes, progress bars;
* ``data/``, ``phantoms/``: readers, NIfTI I/O, preprocessing; the phantom cohorts;
* ``method/``: the QC method (metrics, assessment, selection, training, the train / assess /
  refine workflows, evaluation);
* ``ops/``: per-case scoring for services, drift windows, the promotion gate, the monitor;
* ``cli/``: the ``qcloop`` command line; ``benchmarks/``.
"""

from __future__ import annotations

import pluggy

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
    WindowStats,
)
from qcloop.monitor.core.interfaces import (
    AliasMove,
    CaseReconstructor,
    Fences,
    ModelRef,
    ModelRegistry,
    QCModule,
    Refiner,
    Runtime,
    Segmenter,
    ThresholdStrategy,
    Tracker,
)
from qcloop.monitor.core.slices import FlaggedSet, SliceSet

__all__ = [
    "LABELS",
    "STRUCTURES",
    "AdmissionChanged",
    "AliasMove",
    "CaseFailed",
    "CaseReconstructor",
    "CaseScored",
    "DriftAlert",
    "FeedbackReceived",
    "Fences",
    "FlaggedSet",
    "ModelRef",
    "ModelRefined",
    "ModelRegistry",
    "ModelVersionPromoted",
    "ModelVersionRegistered",
    "ModelsLoaded",
    "QCModule",
    "Refiner",
    "Runtime",
    "Segmenter",
    "ServiceInfo",
    "SliceSet",
    "ThresholdStrategy",
    "Tracker",
    "WindowChanged",
    "WindowStats",
    "__version__",
    "hookimpl",
]

try:
    from importlib.metadata import version as _version

    __version__: str = _version("qcloop")
except Exception:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

hookimpl = pluggy.HookimplMarker("qcloop")
"""Marker for plugin hook implementations (``@hookimpl``)."""

#: Label convention inside qcloop, fixed everywhere: readers map other layouts to it once.
LABELS: dict[int, str] = {0: "background", 1: "LV", 2: "MYO", 3: "RV"}
#: Foreground structures by name, to their label value.
STRUCTURES: dict[str, int] = {"LV": 1, "MYO": 2, "RV": 3}
