"""Drift arithmetic: a case's decision pDC, the rolling window of one view (its OoD fraction and
median decision pDC) and the drift policy's limits and verdict. Pure computations; the window
per view that services keep and publish is :class:`~qcloop.monitor.ops.windows.ViewWindows`."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from qcloop.monitor.core.events import WindowStats


def decision_pdc(record: dict[str, Any]) -> float:
    """A record's best decision-structure pDC over candidates (what its fences judged).

    ``decision_structure == "mean"`` averages the structures' pDC per candidate first.
    """
    structure = record.get("decision_structure", "RV")
    values = []
    for cand in record["candidates"]:
        if structure == "mean":
            values.append(sum(s["pdc"] for s in cand.values()) / len(cand))
        else:
            values.append(cand[structure]["pdc"])
    best = max(values)
    if not math.isfinite(best):
        raise ValueError(f"non-finite pDC in the record of {record.get('image')}")
    return float(best)


class RollingWindow:
    """The last ``size`` cases of one view: (OoD flag, decision pDC) pairs, each with an
    optional payload (what the caller needs to know about the case, e.g. where its input is).

    Not thread-safe on its own: :class:`~qcloop.monitor.ops.windows.ViewWindows` serialises it.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size = int(size)
        self._cases: deque[tuple[bool, float, Any]] = deque(maxlen=self.size)

    def __len__(self) -> int:
        return len(self._cases)

    def add(self, ood: bool, pdc: float, item: Any = None) -> None:
        """Append one case (the oldest drops out when full)."""
        if not math.isfinite(pdc):
            raise ValueError(f"non-finite pDC {pdc!r}")
        self._cases.append((bool(ood), float(pdc), item))

    def add_record(self, record: dict[str, Any]) -> None:
        """Append a case from its JSON record."""
        self.add(bool(record.get("ood")), decision_pdc(record))

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        """Append several records in order."""
        for rec in records:
            self.add_record(rec)

    def clear(self) -> None:
        """Forget every case (after a refinement the window starts again)."""
        self._cases.clear()

    def pairs(self) -> list[tuple[bool, float]]:
        """The (OoD flag, decision pDC) of every case, oldest first."""
        return [(ood, pdc) for ood, pdc, _ in self._cases]

    def items(self) -> list[Any]:
        """The payload of every case, oldest first (``None`` where none was given)."""
        return [item for _, _, item in self._cases]

    def stats(self) -> WindowStats:
        """Size, OoD fraction and median pDC of the window (fraction 0 and no median if empty)."""
        n = len(self._cases)
        if n == 0:
            return WindowStats(0, 0.0, None)
        flagged = sum(1 for ood, _, _ in self._cases if ood)
        median = statistics.median(p for _, p, _ in self._cases)
        return WindowStats(n, flagged / n, float(median))


@dataclass(frozen=True)
class DriftLimits:
    """The drift policy of one view: judged once ``min_cases`` cases are in the window."""

    min_cases: int = 10
    ood_fraction_limit: float = 0.3
    median_pdc_shift_limit: float = 0.1

    @classmethod
    def from_config(cls, monitoring: Any) -> DriftLimits:
        """The limits of a ``monitoring`` configuration section."""
        return cls(
            min_cases=int(monitoring.min_cases),
            ood_fraction_limit=float(monitoring.ood_fraction_limit),
            median_pdc_shift_limit=float(monitoring.median_pdc_shift_limit),
        )


@dataclass(frozen=True)
class DriftDecision:
    """Whether a window drifted, and why (one human-readable line per broken limit)."""

    alert: bool
    reasons: tuple[str, ...]
    stats: WindowStats
    reference_median: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "alert": self.alert,
            "reasons": list(self.reasons),
            "window": self.stats.to_dict(),
            "reference_median": self.reference_median,
        }


def judge_drift(
    stats: WindowStats, reference_median: float | None, limits: DriftLimits
) -> DriftDecision:
    """Apply the drift policy to a window's statistics.

    Alert when the window holds at least ``min_cases`` cases and either its OoD fraction is above
    ``ood_fraction_limit`` or its median decision pDC is below ``reference_median -
    median_pdc_shift_limit`` (the second rule needs a reference median).
    """
    reasons: list[str] = []
    if stats.n >= limits.min_cases:
        if stats.ood_fraction > limits.ood_fraction_limit:
            reasons.append(
                f"OoD fraction {stats.ood_fraction:.3f} > limit {limits.ood_fraction_limit:.3f} "
                f"({stats.n} cases)"
            )
        if reference_median is not None and stats.median_pdc is not None:
            floor = reference_median - limits.median_pdc_shift_limit
            if stats.median_pdc < floor:
                reasons.append(
                    f"median pDC {stats.median_pdc:.3f} < reference {reference_median:.3f} - "
                    f"{limits.median_pdc_shift_limit:.3f}"
                )
    return DriftDecision(bool(reasons), tuple(reasons), stats, reference_median)
