"""qcloop core: hook specifications, plugin manager, configuration, data I/O, metrics, the QC loop
and the command line.

Plugin authors need one import::

    from qcloop.monitor import hookimpl
"""

from __future__ import annotations

import pluggy

__all__ = ["LABELS", "STRUCTURES", "__version__", "hookimpl"]

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
