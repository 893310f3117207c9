"""What every threshold strategy shares: checking the scores it is fitted on, and fences as a
frozen dataclass that judges a case and round-trips through JSON.

A strategy plugin subclasses :class:`FencesRecord` with its own fields (``pdc_low`` and
``phd_high`` first) and calls :func:`checked_scores` at the top of ``fit``; the core never needs
to know more about its fences than :class:`~qcloop.monitor.core.interfaces.Fences` says.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from typing import Any, TypeVar

import numpy as np

__all__ = ["FencesRecord", "checked_scores", "finite_scores"]

F = TypeVar("F", bound="FencesRecord")


def finite_scores(values: Sequence[float], name: str) -> np.ndarray:
    """``values`` as a 1-D float64 array; ``ValueError`` naming the first NaN or inf."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        index = int(bad[0])
        raise ValueError(
            f"{name}[{index}] is {float(array[index])} ({bad.size} non-finite value(s)); "
            "quality scores must be finite (an empty-mask penalty must be a finite number)"
        )
    return array


def checked_scores(
    pdc: Sequence[float], phd: Sequence[float], penalised: Sequence[bool] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pDC, pHD (mm) and the penalised mask of a population as arrays, after checking that
    they are non-empty, finite, in range (pDC in [0, 1], pHD >= 0) and of one length; raises
    ``ValueError`` naming the problem. ``penalised=None`` means no case is penalised."""
    pdc_all = finite_scores(pdc, "pDC")
    phd_all = finite_scores(phd, "pHD")
    if pdc_all.size != phd_all.size:
        raise ValueError(f"pDC has {pdc_all.size} values but pHD has {phd_all.size}")
    if pdc_all.size == 0:
        raise ValueError("cannot fit fences on no cases: pDC and pHD are empty")
    if pdc_all.min() < 0 or pdc_all.max() > 1:
        raise ValueError(f"pDC values must lie in [0, 1], got [{pdc_all.min()}, {pdc_all.max()}]")
    if phd_all.min() < 0:
        raise ValueError(f"pHD values must be >= 0 mm, got minimum {phd_all.min()}")
    if penalised is None:
        return pdc_all, phd_all, np.zeros(pdc_all.size, dtype=bool)
    mask = np.asarray(penalised)
    if mask.ndim != 1 or mask.size != pdc_all.size:
        raise ValueError(
            f"penalised must have one flag per case ({pdc_all.size}), got shape {mask.shape}"
        )
    if mask.dtype != bool:
        raise ValueError(f"penalised must hold booleans, got dtype {mask.dtype}")
    return pdc_all, phd_all, mask


class FencesRecord:
    """Base of a strategy's fences, for a frozen dataclass whose fields start with
    ``pdc_low`` and ``phd_high``: a case fails when ``pdc < pdc_low`` or ``phd > phd_high``.

    Subclasses call :meth:`_check_fields` from ``__post_init__``: every field must be a finite
    number, except the ones named as integers (``>= 0``), booleans or strings.
    """

    pdc_low: float
    phd_high: float

    def _check_fields(
        self,
        ints: Sequence[str] = (),
        bools: Sequence[str] = (),
        strings: Sequence[str] = (),
    ) -> None:
        """Validate the dataclass fields by kind; floats are stored as ``float``."""
        kind = type(self).__name__
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in strings:
                continue
            if f.name in bools:
                if not isinstance(value, bool):
                    raise ValueError(f"{kind}.{f.name} must be a bool, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                noun = "a non-negative integer" if f.name in ints else "a number"
                raise ValueError(f"{kind}.{f.name} must be {noun}, got {value!r}")
            elif f.name in ints:
                if not isinstance(value, int) or value < 0:
                    raise ValueError(
                        f"{kind}.{f.name} must be a non-negative integer, got {value!r}"
                    )
            elif not math.isfinite(value):
                raise ValueError(f"{kind}.{f.name} must be finite, got {value!r}")
            else:
                object.__setattr__(self, f.name, float(value))

    def is_outlier(self, pdc: float, phd: float) -> bool:
        """Whether a case with this pDC and pHD (mm) lies outside the fences."""
        if not (math.isfinite(pdc) and math.isfinite(phd)):
            raise ValueError(f"pDC and pHD must be finite, got pDC={pdc!r}, pHD={phd!r}")
        return pdc < self.pdc_low or phd > self.phd_high

    def to_dict(self) -> dict[str, Any]:
        """The fences as a JSON-serialisable dict (finite numbers, ints, bools and strings)."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[F], data: Mapping[str, Any]) -> F:
        """Fences from a dict written by :meth:`to_dict`; missing, unknown or invalid values
        raise ``ValueError``."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        missing, unknown = sorted(names - set(data)), sorted(set(data) - names)
        if missing or unknown:
            raise ValueError(
                f"invalid {cls.__name__} dict: missing keys {missing}, unknown keys {unknown}"
            )
        return cls(**{name: data[name] for name in names})
