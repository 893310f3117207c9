"""A view's reference fences in its run folder, ``RUN/<VIEW>/fences.json``, written and read
back through the threshold strategy that fitted them.

Format 2 (this version)::

    {"format": 2,
     "strategy": {"name": "iqr", "params": {"k": 1.5}},
     "phases": {"ED": {...}, "ES": {...}, "all": {...}},       # each Fences.to_dict()
     "reference": {"median_pdc": 0.87, "cases": 12}}           # the calibration cases

The strategy named there turns each phase's dict back into fences
(``ThresholdStrategy.fences_from_dict``), so a third-party strategy's fences load wherever the
built-in ones do. Files written before format 2 hold only the phases; the built-in ``iqr``
strategy wrote them all, so they are read through it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcloop.monitor.core import atomic
from qcloop.monitor.core.config import ComponentConfig
from qcloop.monitor.core.interfaces import Fences

__all__ = [
    "FENCES_FILE",
    "FENCES_FORMAT",
    "LEGACY_STRATEGY",
    "FencesFileError",
    "ReferenceFences",
    "load_reference_fences",
    "reference_summary",
    "save_reference_fences",
]

FENCES_FILE = "fences.json"
FENCES_FORMAT = 2
#: The strategy that wrote every fences.json before format 2 (the only one qcloop had).
LEGACY_STRATEGY = ComponentConfig(name="iqr", params={})


class FencesFileError(ValueError):
    """A fences file that cannot be read back (names the file and the problem)."""


@dataclass
class ReferenceFences:
    """A view's reference fences per phase (``"all"`` pooled), the strategy that fitted them,
    and the calibration cases' median decision pDC (``None`` in files written before it was
    recorded)."""

    strategy: ComponentConfig
    phases: dict[str, Fences]
    reference: dict[str, Any] | None = field(default=None)

    @property
    def reference_median(self) -> float | None:
        """The calibration cases' median decision pDC, when recorded."""
        if not self.reference:
            return None
        return float(self.reference["median_pdc"])


def reference_summary(best_pdc: Sequence[float]) -> dict[str, Any] | None:
    """``{"median_pdc", "cases"}`` of the calibration cases' best decision pDC (``None``
    for no case)."""
    values = [float(v) for v in best_pdc]
    if not values:
        return None
    return {"median_pdc": float(statistics.median(values)), "cases": len(values)}


def save_reference_fences(view_dir: Path, fences: ReferenceFences) -> Path:
    """Write ``view_dir/fences.json`` (format 2) atomically; returns its path."""
    path = Path(view_dir) / FENCES_FILE
    atomic.write_json(
        path,
        {
            "format": FENCES_FORMAT,
            "strategy": fences.strategy.model_dump(mode="json"),
            "phases": {phase: f.to_dict() for phase, f in fences.phases.items()},
            "reference": fences.reference,
        },
    )
    return path


def load_reference_fences(path: Path, strategies: Mapping[str, Any]) -> ReferenceFences:
    """Read a fences file back through the strategy that wrote it.

    Args:
        path: the ``fences.json`` file.
        strategies: the threshold-strategy registry (name -> registered component).

    Raises:
        FencesFileError: unreadable JSON, an unknown format, a strategy no plugin registers,
            or fences the strategy refuses.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise FencesFileError(f"{path}: cannot read fences ({exc})") from None
    strategy_cfg, phases, reference = _parse(path, data)
    if strategy_cfg.name not in strategies:
        raise FencesFileError(
            f"{path}: written by threshold strategy {strategy_cfg.name!r}, which no loaded "
            f"plugin registers (available: {', '.join(sorted(strategies)) or 'none'}); install "
            "or unblock the plugin that provides it"
        )
    strategy = strategies[strategy_cfg.name].factory(**strategy_cfg.params)
    out: dict[str, Fences] = {}
    for phase, d in phases.items():
        try:
            out[phase] = strategy.fences_from_dict(d)
        except (TypeError, ValueError) as exc:
            raise FencesFileError(
                f"{path}: phase {phase!r}: strategy {strategy_cfg.name!r} cannot read its "
                f"fences ({exc})"
            ) from None
    return ReferenceFences(strategy_cfg, out, reference)


def _parse(
    path: Path, data: Any
) -> tuple[ComponentConfig, dict[str, dict[str, Any]], dict[str, Any] | None]:
    """(strategy, phase dicts, reference) of a fences file, of either format."""
    if not isinstance(data, dict):
        raise FencesFileError(f"{path}: expected a JSON object")
    if "format" not in data:  # before format 2: phases only, all written by iqr
        return LEGACY_STRATEGY, data, None
    if data["format"] != FENCES_FORMAT:
        raise FencesFileError(
            f"{path}: fences format {data['format']!r}; this qcloop reads {FENCES_FORMAT}"
        )
    try:
        strategy = ComponentConfig.model_validate(data["strategy"])
        phases = dict(data["phases"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FencesFileError(f"{path}: invalid strategy or phases ({exc})") from None
    reference = data.get("reference")
    if reference is not None and not isinstance(reference.get("median_pdc"), int | float):
        raise FencesFileError(f"{path}: reference.median_pdc must be a number")
    return strategy, phases, reference
