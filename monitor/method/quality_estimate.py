"""The calibrated quality estimate: ``est_dice`` and ``est_hd_mm`` per case and structure, with
a prediction interval, from a calibrator fitted on reference cases where ground truth exists.

pDC is a surrogate that runs below true Dice under shift; a calibrator (a registered plugin,
:class:`~qcloop.monitor.core.interfaces.QualityCalibrator`; ``isotonic`` by default) maps a
case's QC signals to the true score it predicts. Per view, structure and target (Dice, HD in
mm) the core:

* builds the signals of the QC-selected output (:data:`FEATURES`: its pDC, pHD, the segmenter's
  softmax entropy, the candidates' agreement; an averaged selection takes the mean of its two
  candidates);
* fits the calibrator on every reference case and, for the interval, cross-fits it on
  :data:`FOLDS` folds: the interval is the estimate +- the ``level`` quantile of the
  out-of-fold absolute errors (split-conformal; nominal coverage ``level`` when new cases are
  exchangeable with the reference cases, which a shift can break: ``qcloop evaluate-qc``
  measures the real coverage);
* falls back to pDC (and pHD), with a warning stored in the run, when there are fewer than
  :data:`MIN_CASES` reference cases or fewer than :data:`MIN_FAILURES` failures (true Dice below
  ``failure_dice``) among them: a calibrator that never saw a failure cannot say what one
  looks like.

Every estimate is clipped (Dice to [0, 1], HD to >= 0) and finite: a non-finite prediction
falls back to pDC for that case. Stored as ``RUN/<VIEW>/estimator.json``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor.core import atomic

log = logging.getLogger(__name__)

__all__ = [
    "ESTIMATOR_FILE",
    "FEATURES",
    "MIN_CASES",
    "MIN_FAILURES",
    "Estimator",
    "fit_estimator",
    "load_estimator",
    "record_features",
]

ESTIMATOR_FILE = "estimator.json"
#: The signals of the selected output, in column order for the Dice target (the HD target
#: swaps the first two: its primary signal is pHD).
FEATURES = ("pdc", "phd_mm", "entropy", "agreement")
TARGETS = {"dice": ("dice", (0.0, 1.0)), "hd_mm": ("hd", (0.0, math.inf))}
MIN_CASES = 20
MIN_FAILURES = 3
FOLDS = 5


def record_features(rec: Mapping[str, Any], structure: str) -> dict[str, float]:
    """The selected output's signals for ``structure`` in a judged record (``nan`` where the
    record has none: masks scored without their probabilities have no entropy)."""
    sel = rec.get("selection") or {}
    picked = [sel["index"]] if sel.get("index") is not None else list(sel.get("indices") or [0])
    cands = [rec["candidates"][i][structure] for i in picked]
    signals = rec.get("signals") or {}
    entropy = signals.get("entropy")
    return {
        "pdc": float(np.mean([c["pdc"] for c in cands])),
        "phd_mm": float(np.mean([c["phd_mm"] for c in cands])),
        "entropy": float(np.mean([entropy[i][structure] for i in picked])) if entropy else math.nan,
        "agreement": float((signals.get("agreement") or {}).get(structure, math.nan)),
    }


def _columns(target: str) -> tuple[str, ...]:
    return FEATURES if target == "dice" else ("phd_mm", "pdc", *FEATURES[2:])


def _matrix(features: Sequence[Mapping[str, float]], target: str, n_signals: int) -> np.ndarray:
    cols = _columns(target)[:n_signals]
    return np.array([[f[c] for c in cols] for f in features], float).reshape(len(features), -1)


@dataclass
class _Fit:
    """One structure's and target's fitted calibrator (``calibrator`` None: the pDC fallback)."""

    calibrator: Any = None
    halfwidth: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _factory(calibrators: Mapping[str, Any], name: str) -> Any:
    """The factory of ``name`` in a registry of calibrators (or a plain name -> factory map)."""
    entry = calibrators[name]
    return getattr(entry, "factory", entry)


def _n_signals(calibrator: Any) -> int:
    return int(getattr(calibrator, "n_signals", len(FEATURES)))


def _cross_fit_halfwidth(
    factory: Any, x: np.ndarray, y: np.ndarray, level: float, bounds: tuple[float, float]
) -> float:
    """The ``level`` quantile of out-of-fold absolute errors (split-conformal half width) of
    the estimate as it is applied (a non-finite prediction replaced by the primary signal)."""
    n = len(y)
    folds = np.random.default_rng(0).permutation(n) % min(FOLDS, n)
    errors = np.empty(n)
    for k in np.unique(folds):
        test = folds == k
        cal = factory()
        cal.fit(x[~test], y[~test])
        pred = np.asarray(cal.predict(x[test]), float)
        pred = np.where(np.isfinite(pred), pred, x[test, 0])  # as applied: pDC/pHD instead
        errors[test] = np.abs(np.clip(pred, *bounds) - y[test])
    q = min(1.0, math.ceil((n + 1) * level) / n)
    return float(np.quantile(errors, q, method="higher"))


def _fit_one(
    factory: Any, feats: list[dict[str, float]], y: np.ndarray, target: str, level: float
) -> tuple[Any, float]:
    bounds = TARGETS[target][1]
    cal = factory()
    x = _matrix(feats, target, _n_signals(cal))
    if not np.isfinite(x).all():
        raise ValueError(
            "some reference cases lack a signal this calibrator uses (masks scored without "
            "probabilities have no entropy or agreement)"
        )
    cal.fit(x, y)
    return cal, _cross_fit_halfwidth(factory, x, y, level, bounds)


class Estimator:
    """One view's fitted calibrators, per structure and target, and how they were fitted."""

    def __init__(
        self,
        name: str,
        params: Mapping[str, Any],
        fits: dict[str, dict[str, _Fit]],
        *,
        level: float,
        failure_dice: float,
        warnings: Sequence[str] = (),
        fitted_on: Mapping[str, Any] | None = None,
    ) -> None:
        self.name, self.params, self.fits = name, dict(params), fits
        self.level, self.failure_dice = level, failure_dice
        self.warnings = list(warnings)
        self.fitted_on = dict(fitted_on or {})
        #: ``assessment.flag_on: est``: a case whose decision est_dice is below this is flagged
        #: (set by :func:`load_estimator` from the run's configuration; ``None``: fences flag)
        self.flag_below: float | None = None

    def apply(self, rec: dict[str, Any]) -> None:
        """Add the record's ``estimate``; with :attr:`flag_below`, flag the judged record by it
        (``ood``: decision est_dice below the floor; the fences' verdict kept as ``ood_fences``).
        """
        rec["estimate"] = self.estimate(rec)
        if self.flag_below is None or rec.get("ood") is None:
            return
        est = decision_est(rec)
        if est is not None:
            rec["ood_fences"] = rec["ood"]
            rec["ood"] = bool(est < self.flag_below)

    def estimate(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """The record's ``estimate`` field: per structure ``dice``, ``dice_lo``, ``dice_hi``,
        ``hd_mm``, ``hd_lo_mm``, ``hd_hi_mm`` and ``source`` (``calibrated`` or ``pdc``)."""
        out: dict[str, Any] = {}
        for structure, targets in self.fits.items():
            feats = record_features(rec, structure)
            entry: dict[str, Any] = {}
            sources = set()
            for target, fit in targets.items():
                est, lo, hi, source = _apply(fit, feats, target)
                names = ("dice", "dice_lo", "dice_hi") if target == "dice" else (
                    "hd_mm", "hd_lo_mm", "hd_hi_mm")  # fmt: skip
                entry.update(zip(names, (est, lo, hi), strict=True))
                sources.add(source)
            entry["source"] = "calibrated" if sources == {"calibrated"} else "pdc"
            out[structure] = entry
        return {"calibrator": self.name, "level": self.level, "structures": out}

    def to_dict(self) -> dict[str, Any]:
        """The ``estimator.json`` content."""
        return {
            "format": 1,
            "calibrator": self.name,
            "params": self.params,
            "level": self.level,
            "failure_dice": self.failure_dice,
            "fitted_on": self.fitted_on,
            "warnings": self.warnings,
            "structures": {
                s: {
                    t: {
                        "source": "calibrated" if f.calibrator is not None else "pdc",
                        "state": f.calibrator.to_dict() if f.calibrator is not None else None,
                        "halfwidth": f.halfwidth,
                        **f.info,
                    }
                    for t, f in targets.items()
                }
                for s, targets in self.fits.items()
            },
        }


def _apply(
    fit: _Fit, feats: Mapping[str, float], target: str
) -> tuple[float, float | None, float | None, str]:
    """(estimate, low, high, source) of one target; pDC/pHD when uncalibrated or non-finite."""
    lo_b, hi_b = TARGETS[target][1]
    raw = feats["pdc"] if target == "dice" else feats["phd_mm"]
    fallback = (float(np.clip(raw, lo_b, hi_b)), None, None, "pdc")
    if fit.calibrator is None:
        return fallback
    x = _matrix([feats], target, _n_signals(fit.calibrator))
    if not np.isfinite(x).all():
        return fallback
    est = float(fit.calibrator.predict(x)[0])
    if not math.isfinite(est):
        return fallback
    est = float(np.clip(est, lo_b, hi_b))
    h = float(fit.halfwidth or 0.0)
    return (
        est,
        float(np.clip(est - h, lo_b, hi_b)),
        float(np.clip(est + h, lo_b, hi_b)),
        "calibrated",
    )


def _reference_rows(
    records: Iterable[Mapping[str, Any]], structure: str
) -> tuple[list[dict[str, float]], np.ndarray, np.ndarray]:
    """Signals, true Dice and true HD of the judged reference records with finite values."""
    feats, dice, hd = [], [], []
    for rec in records:
        true = (rec.get("true_selected") or {}).get(structure)
        if not true:
            continue
        f = record_features(rec, structure)
        d, h = float(true["dice"]), float(true["hd_mm"])
        if math.isfinite(d) and math.isfinite(h) and math.isfinite(f["pdc"] + f["phd_mm"]):
            feats.append(f)
            dice.append(d)
            hd.append(h)
    return feats, np.array(dice), np.array(hd)


def fit_estimator(
    records: Sequence[Mapping[str, Any]],
    calibrators: Mapping[str, Any],
    name: str = "isotonic",
    params: Mapping[str, Any] | None = None,
    *,
    level: float = 0.9,
    failure_dice: float = 0.8,
    structures: Sequence[str] = ("LV", "MYO", "RV"),
    fitted_on: Mapping[str, Any] | None = None,
) -> Estimator:
    """Fit one view's estimator on judged records with ground truth (``true_selected``);
    ``calibrators``: the registered calibrator factories, ``name`` the one to use."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    factory = functools.partial(_factory(calibrators, name), **dict(params or {}))
    fits: dict[str, dict[str, _Fit]] = {}
    warnings: list[str] = []
    for s in structures:
        feats, dice, hd = _reference_rows(records, s)
        n, failures = len(dice), int((dice < failure_dice).sum())
        info = {"cases": n, "failures": failures}
        why = None
        if n < MIN_CASES:
            why = f"{s}: {n} reference case(s) with ground truth, fewer than {MIN_CASES}"
        elif failures < MIN_FAILURES:
            why = (f"{s}: {failures} failure(s) (true Dice < {failure_dice}) among {n} "
                   f"reference cases, fewer than {MIN_FAILURES}")  # fmt: skip
        if why is None:
            try:
                fits[s] = {
                    t: _Fit(*_fit_one(factory, feats, y, t, level), info=info)
                    for t, y in (("dice", dice), ("hd_mm", hd))
                }
                continue
            except (ValueError, np.linalg.LinAlgError) as exc:
                why = f"{s}: the {name} calibrator could not be fitted ({exc})"
        warnings.append(f"{why}; the estimate falls back to pDC/pHD")
        log.warning("%s; the estimate falls back to pDC/pHD", why)
        fits[s] = {t: _Fit(info=info) for t in ("dice", "hd_mm")}
    return Estimator(
        name, dict(params or {}), fits, level=level, failure_dice=failure_dice,
        warnings=warnings, fitted_on=fitted_on,
    )  # fmt: skip


def save_estimator(view_dir: Path, estimator: Estimator) -> Path:
    """Write ``view_dir/estimator.json`` atomically; its path."""
    path = Path(view_dir) / ESTIMATOR_FILE
    atomic.write_json(path, estimator.to_dict())
    return path


def estimator_from_dict(data: Mapping[str, Any], calibrators: Mapping[str, Any]) -> Estimator:
    """The inverse of :meth:`Estimator.to_dict` (``ValueError`` on a malformed file)."""
    try:
        factory = functools.partial(
            _factory(calibrators, data["calibrator"]), **data.get("params", {})
        )
        fits: dict[str, dict[str, _Fit]] = {}
        for s, targets in data["structures"].items():
            fits[s] = {}
            for t, entry in targets.items():
                info = {k: entry[k] for k in ("cases", "failures") if k in entry}
                cal = None
                if entry["source"] == "calibrated":
                    cal = factory()
                    cal.load_dict(entry["state"])
                fits[s][t] = _Fit(cal, entry.get("halfwidth"), info)
        return Estimator(
            data["calibrator"], data.get("params", {}), fits, level=float(data["level"]),
            failure_dice=float(data["failure_dice"]), warnings=data.get("warnings", []),
            fitted_on=data.get("fitted_on"),
        )  # fmt: skip
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not an estimator file ({type(exc).__name__}: {exc})") from exc


def load_estimator(run_dir: Path, view: str, assessment: Any = None) -> Estimator | None:
    """``RUN/<view>/estimator.json`` read back (``None`` when the run has none); a malformed
    file is a ``ValueError`` naming it. Read once per scorer, not per case. With the run's
    ``assessment`` section and ``flag_on: est``, the estimator also flags cases
    (:meth:`Estimator.apply`), and a run without one is a ``RunError``."""
    import json

    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    path = Path(run_dir) / view / ESTIMATOR_FILE
    flag_on_est = assessment is not None and assessment.flag_on == "est"
    if not path.is_file():
        if flag_on_est:
            from qcloop.monitor.method.run_folder import RunError

            raise RunError(
                f"{path}: missing; assessment.flag_on is est, which flags cases by the "
                "calibrated estimate: fit one with qcloop fit-estimator, or flag on fences"
            )
        return None
    try:
        est = estimator_from_dict(json.loads(path.read_text()), get_plugin_manager().calibrators())
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if flag_on_est:
        est.flag_below = float(assessment.est_flag_dice)
    return est


def decision_est(record: Mapping[str, Any]) -> float | None:
    """A record's ``est_dice`` of its decision structure (the mean over its scored structures
    for ``"mean"``), or ``None`` when the record carries no (finite) estimate of it."""
    structures = (record.get("estimate") or {}).get("structures") or {}
    structure = record.get("decision_structure", "RV")
    scored = record.get("candidates") or [{}]
    names = list(scored[0]) if structure == "mean" else [structure]
    values = [structures[s]["dice"] for s in names if s in structures]
    if not values or len(values) != len(names):
        return None
    value = float(sum(values) / len(values))
    return value if math.isfinite(value) else None
