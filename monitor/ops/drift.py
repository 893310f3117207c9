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
from qcloop.monitor.method.quality_estimate import decision_est

__all__ = [
    "DriftDecision",
    "DriftLimits",
    "FlagReference",
    "RollingWindow",
    "decision_est",
    "decision_pdc",
    "judge_drift",
]


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
        self._est: deque[float | None] = deque(maxlen=self.size)

    def __len__(self) -> int:
        return len(self._cases)

    def add(self, ood: bool, pdc: float, item: Any = None, est: float | None = None) -> None:
        """Append one case (the oldest drops out when full); ``est``: its decision est_dice."""
        if not math.isfinite(pdc):
            raise ValueError(f"non-finite pDC {pdc!r}")
        if est is not None and not math.isfinite(est):
            raise ValueError(f"non-finite est_dice {est!r}")
        self._cases.append((bool(ood), float(pdc), item))
        self._est.append(None if est is None else float(est))

    def add_record(self, record: dict[str, Any]) -> None:
        """Append a case from its JSON record."""
        self.add(bool(record.get("ood")), decision_pdc(record), est=decision_est(record))

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        """Append several records in order."""
        for rec in records:
            self.add_record(rec)

    def clear(self) -> None:
        """Forget every case (after a refinement the window starts again)."""
        self._cases.clear()
        self._est.clear()

    def pairs(self) -> list[tuple[bool, float]]:
        """The (OoD flag, decision pDC) of every case, oldest first."""
        return [(ood, pdc) for ood, pdc, _ in self._cases]

    def items(self) -> list[Any]:
        """The payload of every case, oldest first (``None`` where none was given)."""
        return [item for _, _, item in self._cases]

    def stats(self) -> WindowStats:
        """Size, OoD fraction, median pDC and median est_dice of the window (fraction 0 and no
        median if empty; no est median when no case has an estimate)."""
        n = len(self._cases)
        if n == 0:
            return WindowStats(0, 0.0, None)
        flagged = sum(1 for ood, _, _ in self._cases if ood)
        median = statistics.median(p for _, p, _ in self._cases)
        ests = [e for e in self._est if e is not None]
        median_est = float(statistics.median(ests)) if ests else None
        return WindowStats(n, flagged / n, float(median), median_est)


@dataclass(frozen=True)
class DriftLimits:
    """The drift policy of one view: judged once ``min_cases`` cases are in the window."""

    min_cases: int = 10
    ood_fraction_limit: float = 0.3
    median_pdc_shift_limit: float = 0.1
    rule: str = "binomial"
    alert_alpha: float = 0.01
    score: str = "pdc"
    min_median_est_dice: float = 0.8

    @classmethod
    def from_config(cls, monitoring: Any) -> DriftLimits:
        """The limits of a ``monitoring`` configuration section."""
        return cls(
            min_cases=int(monitoring.min_cases),
            ood_fraction_limit=float(monitoring.ood_fraction_limit),
            median_pdc_shift_limit=float(monitoring.median_pdc_shift_limit),
            rule=str(monitoring.drift_rule),
            alert_alpha=float(monitoring.alert_alpha),
            score=str(monitoring.drift_score),
            min_median_est_dice=float(monitoring.min_median_est_dice),
        )


@dataclass(frozen=True)
class FlagReference:
    """A model's in-distribution flag rate: ``flagged`` of ``cases`` reference cases, each
    judged by fences fitted on the others (:mod:`qcloop.monitor.method.reference_rate`)."""

    flagged: int
    cases: int

    def __post_init__(self) -> None:
        if not 0 <= self.flagged <= self.cases or self.cases < 1:
            raise ValueError(f"invalid flag reference: {self.flagged} of {self.cases}")

    def tail_probability(self, flagged: int, n: int) -> float:
        """P(at least ``flagged`` of ``n`` new in-distribution cases flagged): the
        beta-binomial predictive of a uniform prior updated with the reference counts, so a
        small reference set widens the test instead of being taken as the exact rate
        (``scipy.stats.betabinom``)."""
        from scipy.stats import betabinom

        a, b = self.flagged + 1, self.cases - self.flagged + 1
        return float(betabinom.sf(flagged - 1, n, a, b))


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
    stats: WindowStats,
    reference_median: float | None,
    limits: DriftLimits,
    flags: FlagReference | None = None,
) -> DriftDecision:
    """Apply the drift policy to a window's statistics.

    Alert when the window holds at least ``min_cases`` cases and either its OoD flags are too
    many, or its quality fell: with ``score == "pdc"`` its median decision pDC is below
    ``reference_median - median_pdc_shift_limit`` (needs a reference median); with ``"est"`` its
    median est_dice is below ``min_median_est_dice`` (needs estimates in the window). Too many flags: with the ``binomial`` rule and a reference
    flag rate ``flags``, a window this flagged or more has probability below ``alert_alpha``
    under that rate; otherwise (rule ``fixed``, or no reference rate) the OoD fraction is above
    ``ood_fraction_limit``.
    """
    reasons: list[str] = []
    if stats.n >= limits.min_cases:
        flag_reason = _flag_reason(stats, limits, flags)
        if flag_reason:
            reasons.append(flag_reason)
        if limits.score == "est":
            if stats.median_est is not None and stats.median_est < limits.min_median_est_dice:
                reasons.append(
                    f"median est Dice {stats.median_est:.3f} < floor "
                    f"{limits.min_median_est_dice:.3f}"
                )
        elif reference_median is not None and stats.median_pdc is not None:
            floor = reference_median - limits.median_pdc_shift_limit
            if stats.median_pdc < floor:
                reasons.append(
                    f"median pDC {stats.median_pdc:.3f} < reference {reference_median:.3f} - "
                    f"{limits.median_pdc_shift_limit:.3f}"
                )
    return DriftDecision(bool(reasons), tuple(reasons), stats, reference_median)


def _flag_reason(stats: WindowStats, limits: DriftLimits, flags: FlagReference | None) -> str:
    """Why the window's OoD flags are too many, or ``""``."""
    k = round(stats.ood_fraction * stats.n)
    if limits.rule == "binomial" and flags is not None:
        p = flags.tail_probability(k, stats.n)
        if p >= limits.alert_alpha:
            return ""
        return (
            f"{k} of {stats.n} cases flagged OoD; the model's in-distribution rate is "
            f"{flags.flagged} of {flags.cases} reference cases (leave-one-out): P = {p:.2g} "
            f"< alert_alpha {limits.alert_alpha:g}"
        )
    if stats.ood_fraction > limits.ood_fraction_limit:
        return (
            f"OoD fraction {stats.ood_fraction:.3f} > limit {limits.ood_fraction_limit:.3f} "
            f"({stats.n} cases)"
        )
    return ""
