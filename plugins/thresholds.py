"""The ``iqr`` threshold strategy: Tukey fences on the QC module's quality estimates.

A case is an outlier when its pseudo-Dice is below ``pdc_low = Q1(pDC) - k * IQR(pDC)`` or its
pseudo-Hausdorff distance (mm) is above ``phd_high = Q3(pHD) + k * IQR(pHD)`` (Galati & Zuluaga
2021, with ``k = 1.5``). Quartiles use numpy's default linear interpolation
(``np.percentile(..., method="linear")``).

Robustness rules, each recorded on the returned :class:`Fences`:

* **Penalised values are left out of the quartiles.** A case whose prediction or reconstruction
  is empty carries a penalty (Dice 0 and a finite HD penalty such as the field-of-view diagonal);
  it is an outlier by construction, so it must not shift the fences. It is still judged by them.
* **Zero overlap is always an outlier.** ``pdc_low`` is never below ``min_pdc_low`` (default
  0.001), so a pDC of 0, which includes every empty-mask penalty, is flagged even when
  ``Q1 - k * IQR`` falls below 0 (where a plain Tukey fence would flag nothing).
* **A degenerate spread uses a floor.** When an IQR is below its floor (``min_iqr_pdc``,
  ``min_iqr_phd_mm``; for example all values equal), the floor is used instead, so a fence never
  collapses onto its quartile and flags every value a hair away from it.
* **Few values widen the fences.** With fewer than 4 usable (non-penalised) cases the quartiles
  are unreliable: the spread used is the largest of the IQR, the sample range and the floor, and
  the fences are marked ``low_confidence``.
* **Non-finite input is refused.** NaN or inf anywhere (penalised entries included) raises
  :class:`ValueError`; no NaN or inf can reach a fence or a statistic.

The strategy is a pure function of the scores it is given: which population they come from (a
reference set, or the unseen cases themselves, transductively) is the core's decision and is
only recorded here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from qcloop.monitor import hookimpl
from qcloop.monitor.core.fences import FencesRecord, checked_scores

__all__ = ["MIN_CONFIDENT_CASES", "Fences", "IQRThresholds", "register_threshold_strategies"]

logger = logging.getLogger(__name__)

Population = Literal["reference", "transductive"]
_POPULATIONS: tuple[str, ...] = ("reference", "transductive")

#: Fewer usable cases than this give low-confidence fences (widened to the sample range).
MIN_CONFIDENT_CASES = 4

_INT_FIELDS = ("n_used", "n_excluded_penalised")
_BOOL_FIELDS = ("pdc_degenerate", "phd_degenerate", "low_confidence", "pdc_low_clamped")


@dataclass(frozen=True)
class Fences(FencesRecord):
    """Outlier fences on pDC and pHD (mm) and the statistics they were computed from.

    Attributes:
        pdc_low: a pDC below this is an outlier.
        phd_high: a pHD (mm) above this is an outlier.
        pdc_q1, pdc_q3, pdc_iqr: quartiles and IQR of the usable pDC values.
        pdc_spread: the spread the fence used (the IQR, or the floor or range that replaced it).
        phd_q1, phd_q3, phd_iqr, phd_spread: the same for pHD, in mm.
        k: the fence multiplier.
        n_used: cases that entered the quartiles.
        n_excluded_penalised: penalised cases left out of the quartiles.
        population: ``"reference"`` or ``"transductive"``: where the scores came from.
        pdc_degenerate, phd_degenerate: the IQR was below its floor, so the floor was used.
        low_confidence: fewer than :data:`MIN_CONFIDENT_CASES` usable cases; fences widened.
        pdc_low_clamped: ``Q1 - k * spread`` was below ``min_pdc_low`` and was raised to it.
    """

    pdc_low: float
    phd_high: float
    pdc_q1: float
    pdc_q3: float
    pdc_iqr: float
    pdc_spread: float
    phd_q1: float
    phd_q3: float
    phd_iqr: float
    phd_spread: float
    k: float
    n_used: int
    n_excluded_penalised: int
    population: Population
    pdc_degenerate: bool
    phd_degenerate: bool
    low_confidence: bool
    pdc_low_clamped: bool

    def __post_init__(self) -> None:
        self._check_fields(ints=_INT_FIELDS, bools=_BOOL_FIELDS, strings=("population",))
        if self.n_used < 1:
            raise ValueError("Fences need at least one usable (non-penalised) case")
        if self.population not in _POPULATIONS:
            raise ValueError(
                f"Fences.population must be one of {_POPULATIONS}, got {self.population!r}"
            )


def _spread(values: np.ndarray, q1: float, q3: float, floor: float, few: bool) -> float:
    """The spread a fence uses: the IQR, widened to the sample range when ``few``, never below ``floor``."""
    spread = q3 - q1
    if few:
        spread = max(spread, float(values.max() - values.min()))
    return max(spread, floor)


class IQRThresholds:
    """Tukey/IQR fences on pDC and pHD (the ``iqr`` threshold strategy).

    Args:
        k: fence multiplier (Tukey's 1.5 by default; 3 gives "far out" fences).
        population: where the scores passed to :meth:`fit` come from, recorded on the fences:
            ``"reference"`` (held-out labelled data) or ``"transductive"`` (the unseen cases).
            A label only: which population qcloop fits fences on is the configuration's
            ``assessment.population``.
        min_iqr_pdc: floor on the pDC spread, used when the IQR is smaller.
        min_iqr_phd_mm: floor on the pHD spread in mm, used when the IQR is smaller.
        min_pdc_low: the lowest value ``pdc_low`` may take, so zero overlap is always an outlier
            (0 disables this and leaves the plain Tukey fence).
    """

    name = "iqr"

    def __init__(
        self,
        k: float = 1.5,
        population: Population = "reference",
        min_iqr_pdc: float = 0.01,
        min_iqr_phd_mm: float = 1.0,
        min_pdc_low: float = 1e-3,
    ) -> None:
        for label, value in (
            ("k", k),
            ("min_iqr_pdc", min_iqr_pdc),
            ("min_iqr_phd_mm", min_iqr_phd_mm),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{label} must be a finite positive number, got {value!r}")
        if not (math.isfinite(min_pdc_low) and 0 <= min_pdc_low < 1):
            raise ValueError(f"min_pdc_low must be in [0, 1), got {min_pdc_low!r}")
        if population not in _POPULATIONS:
            raise ValueError(f"population must be one of {_POPULATIONS}, got {population!r}")
        self.k = float(k)
        self.population: Population = population
        self.min_iqr_pdc = float(min_iqr_pdc)
        self.min_iqr_phd_mm = float(min_iqr_phd_mm)
        self.min_pdc_low = float(min_pdc_low)

    def __repr__(self) -> str:
        return (
            f"IQRThresholds(k={self.k}, population={self.population!r}, "
            f"min_iqr_pdc={self.min_iqr_pdc}, min_iqr_phd_mm={self.min_iqr_phd_mm}, "
            f"min_pdc_low={self.min_pdc_low})"
        )

    def fit(
        self,
        pdc: Sequence[float],
        phd: Sequence[float],
        penalised: Sequence[bool] | None = None,
    ) -> Fences:
        """Fences from one score per case: pDC in [0, 1], pHD in mm (>= 0).

        Args:
            pdc: pseudo-Dice per case.
            phd: pseudo-Hausdorff distance per case, in mm.
            penalised: per case, whether its scores are the empty-mask penalty; those cases are
                left out of the quartiles. ``None`` means no case is penalised.

        Raises:
            ValueError: empty or mismatched inputs, NaN/inf, out-of-range values, or no
                non-penalised case left.
        """
        pdc_all, phd_all, mask = checked_scores(pdc, phd, penalised)
        pdc_used, phd_used = pdc_all[~mask], phd_all[~mask]
        n_used, n_penalised = int(pdc_used.size), int(mask.sum())
        if n_used == 0:
            raise ValueError(
                f"cannot fit fences: all {n_penalised} case(s) are penalised (empty masks), "
                "so no quality score is left to take quartiles of"
            )
        few = n_used < MIN_CONFIDENT_CASES
        pdc_q1, pdc_q3 = (float(q) for q in np.percentile(pdc_used, [25, 75]))
        phd_q1, phd_q3 = (float(q) for q in np.percentile(phd_used, [25, 75]))
        pdc_iqr, phd_iqr = pdc_q3 - pdc_q1, phd_q3 - phd_q1
        pdc_spread = _spread(pdc_used, pdc_q1, pdc_q3, self.min_iqr_pdc, few)
        phd_spread = _spread(phd_used, phd_q1, phd_q3, self.min_iqr_phd_mm, few)
        pdc_low_tukey = pdc_q1 - self.k * pdc_spread
        clamped = self.min_pdc_low > 0 and pdc_low_tukey < self.min_pdc_low
        fences = Fences(
            pdc_low=self.min_pdc_low if clamped else pdc_low_tukey,
            phd_high=phd_q3 + self.k * phd_spread,
            pdc_q1=pdc_q1,
            pdc_q3=pdc_q3,
            pdc_iqr=pdc_iqr,
            pdc_spread=pdc_spread,
            phd_q1=phd_q1,
            phd_q3=phd_q3,
            phd_iqr=phd_iqr,
            phd_spread=phd_spread,
            k=self.k,
            n_used=n_used,
            n_excluded_penalised=n_penalised,
            population=self.population,
            pdc_degenerate=bool(pdc_iqr < self.min_iqr_pdc),
            phd_degenerate=bool(phd_iqr < self.min_iqr_phd_mm),
            low_confidence=few,
            pdc_low_clamped=clamped,
        )
        if few:
            logger.warning(
                "IQR fences from only %d usable case(s) (< %d): widened and marked low-confidence",
                n_used,
                MIN_CONFIDENT_CASES,
            )
        logger.debug("fitted %s", fences)
        return fences

    def fences_from_dict(self, data: Mapping[str, Any]) -> Fences:
        """Fences this strategy wrote (:meth:`Fences.to_dict`), read back from a run folder."""
        return Fences.from_dict(data)


@hookimpl
def register_threshold_strategies(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register the built-in ``iqr`` threshold strategy."""
    register("iqr", IQRThresholds)
