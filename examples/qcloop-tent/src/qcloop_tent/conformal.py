"""The ``conformal`` threshold strategy: fences with a false-alarm guarantee.

A split-conformal (order-statistic) fence on each quality score, calibrated on the reference
population (the validation cases at ``qcloop train``):

* ``pdc_low`` is the ``k``-th smallest reference pDC, ``k = floor(alpha_pdc * (n + 1))``;
* ``phd_high`` is the ``k``-th largest reference pHD (mm), ``k = floor(alpha_phd * (n + 1))``;

and a case is an outlier when ``pdc < pdc_low`` or ``phd > phd_high``.

**The guarantee.** If a new case and the ``n`` reference cases are exchangeable (drawn from the
same distribution), the new pDC's rank among the ``n + 1`` values is uniform, so it falls below
the ``k``-th smallest reference value with probability at most ``k / (n + 1) <= alpha_pdc``
(ties only lower it). The same holds for pHD above the ``k``-th largest. This is the
finite-sample correction: ``n + 1`` and the floor, not ``n``, make the bound exact for every
``n`` rather than asymptotic.

**Sharing alpha between the two fences (Bonferroni).** A case fails when either fence fails;
by the union bound the false-alarm rate is at most ``alpha_pdc + alpha_phd``. The strategy
splits the target ``alpha`` as ``alpha_pdc = pdc_share * alpha`` and
``alpha_phd = (1 - pdc_share) * alpha`` (an even split by default), so the guarantee is
``P(false alarm) <= alpha`` whatever the dependence between pDC and pHD.

**How many reference cases.** A fence needs ``k >= 1``, that is ``n >= 1 / alpha_side - 1``;
with fewer usable cases no fence can honour the target and :meth:`ConformalThresholds.fit`
raises ``ValueError`` saying how many are needed (``alpha = 0.1``, even split: 19).

Cases whose scores are the empty-mask penalty are left out of the calibration (they are
outliers by construction) but are still judged by the fences. NaN or inf is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from qcloop.monitor.core.fences import FencesRecord, checked_scores

__all__ = ["ConformalFences", "ConformalThresholds", "min_reference_cases", "order_rank"]

_INT_FIELDS = ("rank_pdc", "rank_phd", "n_used", "n_excluded_penalised")
#: Absorbs the rounding of ``alpha * (n + 1)`` (0.05 * 20 must give 1, not 0.999...).
_EPS = 1e-9


def order_rank(alpha: float, n: int) -> int:
    """``k = floor(alpha * (n + 1))``: the order statistic whose exceedance probability is
    at most ``alpha`` for ``n`` exchangeable reference values (0: no fence possible)."""
    return math.floor(alpha * (n + 1) + _EPS)


def min_reference_cases(alpha: float) -> int:
    """The fewest reference values for which :func:`order_rank` is at least 1."""
    return max(1, math.ceil(1.0 / alpha - _EPS) - 1)


@dataclass(frozen=True)
class ConformalFences(FencesRecord):
    """Order-statistic fences on pDC and pHD (mm), with how they were calibrated.

    Attributes:
        pdc_low: a pDC below this is an outlier (the ``rank_pdc``-th smallest reference pDC).
        phd_high: a pHD above this is an outlier (the ``rank_phd``-th largest reference pHD).
        alpha: the target false-alarm rate of the two fences together.
        alpha_pdc, alpha_phd: its Bonferroni shares (they sum to ``alpha``).
        rank_pdc, rank_phd: the order statistics used.
        n_used: reference cases in the calibration.
        n_excluded_penalised: penalised reference cases left out of it.
    """

    pdc_low: float
    phd_high: float
    alpha: float
    alpha_pdc: float
    alpha_phd: float
    rank_pdc: int
    rank_phd: int
    n_used: int
    n_excluded_penalised: int

    def __post_init__(self) -> None:
        self._check_fields(ints=_INT_FIELDS)
        if not 0 < self.alpha < 1:
            raise ValueError(f"ConformalFences.alpha must lie in (0, 1), got {self.alpha!r}")
        if min(self.rank_pdc, self.rank_phd) < 1 or self.n_used < max(self.rank_pdc, self.rank_phd):
            raise ValueError(
                f"ConformalFences: ranks ({self.rank_pdc}, {self.rank_phd}) must lie in "
                f"1..n_used ({self.n_used})"
            )


class ConformalThresholds:
    """Split-conformal fences with target false-alarm rate ``alpha`` (the ``conformal``
    threshold strategy).

    Args:
        alpha: the target false-alarm rate on cases from the reference distribution, in (0, 1).
        pdc_share: the share of ``alpha`` given to the pDC fence, in (0, 1); the pHD fence
            gets the rest (Bonferroni split; 0.5 splits evenly).
    """

    name = "conformal"

    def __init__(self, alpha: float = 0.1, pdc_share: float = 0.5) -> None:
        for label, value in (("alpha", alpha), ("pdc_share", pdc_share)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
                raise ValueError(f"conformal strategy: {label} must lie in (0, 1), got {value!r}")
        self.alpha = float(alpha)
        self.pdc_share = float(pdc_share)

    def __repr__(self) -> str:
        return f"ConformalThresholds(alpha={self.alpha}, pdc_share={self.pdc_share})"

    @property
    def alphas(self) -> tuple[float, float]:
        """(alpha_pdc, alpha_phd): the Bonferroni shares of ``alpha``."""
        return self.alpha * self.pdc_share, self.alpha * (1.0 - self.pdc_share)

    def min_cases(self) -> int:
        """The fewest usable reference cases this ``alpha`` can be honoured with."""
        return max(min_reference_cases(a) for a in self.alphas)

    def fit(
        self,
        pdc: Sequence[float],
        phd: Sequence[float],
        penalised: Sequence[bool] | None = None,
    ) -> ConformalFences:
        """Fences from one reference pDC (in [0, 1]) and pHD (mm, >= 0) per case.

        Raises:
            ValueError: mismatched or non-finite inputs, values out of range, or fewer
                usable (non-penalised) cases than ``alpha`` needs.
        """
        pdc_all, phd_all, mask = checked_scores(pdc, phd, penalised)
        pdc_used, phd_used = np.sort(pdc_all[~mask]), np.sort(phd_all[~mask])
        n, needed = int(pdc_used.size), self.min_cases()
        if n < needed:
            raise ValueError(
                f"conformal fences at alpha={self.alpha} (pDC {self.alphas[0]:.4g}, pHD "
                f"{self.alphas[1]:.4g}) need at least {needed} usable reference cases; got {n} "
                f"({int(mask.sum())} penalised case(s) left out); raise alpha or calibrate on "
                "more cases"
            )
        rank_pdc, rank_phd = (order_rank(a, n) for a in self.alphas)
        return ConformalFences(
            pdc_low=float(pdc_used[rank_pdc - 1]),
            phd_high=float(phd_used[n - rank_phd]),
            alpha=self.alpha,
            alpha_pdc=self.alphas[0],
            alpha_phd=self.alphas[1],
            rank_pdc=rank_pdc,
            rank_phd=rank_phd,
            n_used=n,
            n_excluded_penalised=int(mask.sum()),
        )

    def fences_from_dict(self, data: Mapping[str, Any]) -> ConformalFences:
        """Fences this strategy wrote (:meth:`ConformalFences.to_dict`), read back."""
        return ConformalFences.from_dict(data)
