"""The OoD rule and QC-based candidate selection (Galati & Zuluaga 2021, "Learning phases" 2 and 4).

Every function here is a pure function of the candidates' scores: no state survives a call, so
evaluating the same case twice, or other cases in between, always gives the same answer.

* :func:`is_ood`: a case is out-of-distribution when EVERY candidate lies outside the fences.
* :func:`select_candidate`: rank candidates by pDC and take the first whose pHD is below the
  upper fence; when none qualifies, average the best-pDC and best-pHD candidates.
* :func:`apply_selection`: turn a :class:`Selection` into a softmax map.
* :func:`best_values`: a case's best pDC and best pHD over its candidates.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.interfaces import Fences

__all__ = ["Selection", "apply_selection", "best_values", "is_ood", "select_candidate"]


def _scores(pdc: Sequence[float], phd: Sequence[float]) -> tuple[list[float], list[float]]:
    """Validated per-candidate pDC and pHD as lists of floats."""
    pdc_list = [float(v) for v in pdc]
    phd_list = [float(v) for v in phd]
    if not pdc_list:
        raise ValueError("no candidates: pDC and pHD are empty")
    if len(pdc_list) != len(phd_list):
        raise ValueError(
            f"one pDC and one pHD per candidate expected, got {len(pdc_list)} pDC "
            f"and {len(phd_list)} pHD"
        )
    for name, values in (("pDC", pdc_list), ("pHD", phd_list)):
        for index, value in enumerate(values):
            if not math.isfinite(value):
                raise ValueError(f"{name} of candidate {index} is {value!r}; scores must be finite")
    return pdc_list, phd_list


def is_ood(pdc: Sequence[float], phd: Sequence[float], fences: Fences) -> bool:
    """Whether a case is out-of-distribution: every candidate has pDC < pdc_low or pHD > phd_high."""
    pdc_list, phd_list = _scores(pdc, phd)
    return all(fences.is_outlier(d, h) for d, h in zip(pdc_list, phd_list, strict=True))


def _candidate_index(value: Any) -> int:
    """``value`` as a candidate index (a non-negative integer)."""
    if isinstance(value, bool):
        raise ValueError(f"a candidate index must be an integer, got {value!r}")
    try:
        index = operator.index(value)
    except TypeError:
        raise ValueError(f"a candidate index must be an integer, got {value!r}") from None
    if index < 0:
        raise ValueError(f"a candidate index must be >= 0, got {index}")
    return index


@dataclass(frozen=True)
class Selection:
    """The outcome of QC-based selection for one case.

    Attributes:
        kind: ``"candidate"`` (one candidate's map) or ``"average"`` (mean of two maps).
        index: the chosen candidate when ``kind == "candidate"``, else ``None``.
        indices: ``(best_pdc, best_phd)`` candidates averaged when ``kind == "average"``,
            else ``None``.
        reason: why this outcome, in words, with the scores that decided it.
    """

    kind: Literal["candidate", "average"]
    index: int | None = None
    indices: tuple[int, int] | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.kind == "candidate":
            if self.index is None or self.indices is not None:
                raise ValueError("a 'candidate' selection needs an index and no indices")
            object.__setattr__(self, "index", _candidate_index(self.index))
        elif self.kind == "average":
            if self.index is not None or self.indices is None or len(self.indices) != 2:
                raise ValueError("an 'average' selection needs two indices and no index")
            pair = (_candidate_index(self.indices[0]), _candidate_index(self.indices[1]))
            if pair[0] == pair[1]:
                raise ValueError(
                    f"an 'average' selection needs two different candidates, got {pair}"
                )
            object.__setattr__(self, "indices", pair)
        else:
            raise ValueError(f"kind must be 'candidate' or 'average', got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        """The selection as a JSON-serialisable dict (for the per-case QC record)."""
        return {
            "kind": self.kind,
            "index": self.index,
            "indices": list(self.indices) if self.indices is not None else None,
            "reason": self.reason,
        }


def select_candidate(pdc: Sequence[float], phd: Sequence[float], phd_high: float) -> Selection:
    """QC-based selection of one case's output among its candidates.

    Candidates are ranked by pDC, highest first (ties: lower pHD, then candidate order); the
    first whose pHD is strictly below ``phd_high`` is chosen. When none qualifies, the result
    is the average of the best-pDC candidate (first in that ranking) and the best-pHD candidate
    (lowest pHD; ties: higher pDC, then candidate order); when those are the same candidate,
    that candidate alone.

    Args:
        pdc: pseudo-Dice per candidate.
        phd: pseudo-Hausdorff distance per candidate, in mm.
        phd_high: the upper pHD fence (mm).
    """
    pdc_list, phd_list = _scores(pdc, phd)
    if not math.isfinite(phd_high):
        raise ValueError(f"phd_high must be finite, got {phd_high!r}")
    order = sorted(range(len(pdc_list)), key=lambda i: (-pdc_list[i], phd_list[i], i))
    for rank, i in enumerate(order):
        if phd_list[i] < phd_high:
            return Selection(
                kind="candidate",
                index=i,
                reason=(
                    f"candidate {i} is rank {rank + 1} by pDC ({pdc_list[i]:.4g}) and the first "
                    f"with pHD {phd_list[i]:.4g} mm < th_up {phd_high:.4g} mm"
                ),
            )
    best_pdc = order[0]
    best_phd = min(range(len(phd_list)), key=lambda i: (phd_list[i], -pdc_list[i], i))
    if best_pdc == best_phd:
        return Selection(
            kind="candidate",
            index=best_pdc,
            reason=(
                f"no candidate has pHD < th_up {phd_high:.4g} mm; candidate {best_pdc} is both "
                f"the best by pDC ({pdc_list[best_pdc]:.4g}) and by pHD "
                f"({phd_list[best_pdc]:.4g} mm)"
            ),
        )
    return Selection(
        kind="average",
        indices=(best_pdc, best_phd),
        reason=(
            f"no candidate has pHD < th_up {phd_high:.4g} mm; averaging best-pDC candidate "
            f"{best_pdc} (pDC {pdc_list[best_pdc]:.4g}) and best-pHD candidate {best_phd} "
            f"(pHD {phd_list[best_phd]:.4g} mm)"
        ),
    )


def apply_selection(selection: Selection, probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """The selected softmax map: a copy of the chosen candidate's, or the mean of the two maps."""
    n = len(probabilities)
    if n == 0:
        raise ValueError("no candidate probability maps given")
    wanted = [selection.index] if selection.kind == "candidate" else list(selection.indices or ())
    for i in wanted:
        if i is None or not 0 <= i < n:
            raise ValueError(f"selection refers to candidate {i} but only {n} maps were given")
    if selection.kind == "candidate":
        return np.array(probabilities[wanted[0]], copy=True)
    first = np.asarray(probabilities[wanted[0]])
    second = np.asarray(probabilities[wanted[1]])
    if first.shape != second.shape:
        raise ValueError(
            f"cannot average maps of different shapes {first.shape} and {second.shape}"
        )
    dtype = np.result_type(first.dtype, second.dtype, np.float32)
    return (first.astype(dtype) + second.astype(dtype)) / dtype.type(2)


def best_values(
    pdc_by_candidate: Sequence[float], phd_by_candidate: Sequence[float]
) -> tuple[float, float]:
    """A case's best pDC (maximum) and best pHD (minimum, mm) over its candidates."""
    pdc_list, phd_list = _scores(pdc_by_candidate, phd_by_candidate)
    return max(pdc_list), min(phd_list)
