"""Built-in quality calibrators: ``isotonic`` (the default) and ``linear``.

* ``isotonic``: a monotone, non-decreasing map of the primary signal alone (pDC for Dice, pHD
  for HD), fitted by pool-adjacent-violators (``scipy.optimize.isotonic_regression``), one knot
  per pooled block at its mean signal (centred isotonic regression, Oron & Flournoy 2017),
  linear between knots and flat beyond them. It re-scales pDC without reordering cases inside
  the fitted range, so it keeps pDC's ranking (its Spearman r and AUROC) and corrects its bias.
* ``linear``: ridge regression on every signal (standardised), for teams whose cases need the
  other signals (segmenter entropy, candidate agreement) to be told apart.

Both are hand-written on numpy/scipy because they are a few lines each and keep the base install
free of scikit-learn; the intervals, clipping and fallbacks are the core's
(:mod:`qcloop.monitor.method.quality_estimate`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from qcloop.monitor import hookimpl

__all__ = ["IsotonicCalibrator", "LinearCalibrator", "register_calibrators"]


class IsotonicCalibrator:
    """Non-decreasing in feature 0; the other features are ignored."""

    #: the leading feature columns it uses (the primary signal only: works on masks scored
    #: without their probabilities)
    n_signals = 1

    def __init__(self) -> None:
        self.x: np.ndarray = np.zeros(0)
        self.y: np.ndarray = np.zeros(0)

    def fit(self, features: np.ndarray, target: np.ndarray) -> None:
        """Pool-adjacent-violators on (feature 0, target), ties in the signal averaged; each
        pooled block becomes one knot at its weighted mean signal (centred isotonic
        regression), so the map rises strictly between knots and keeps pDC's ranking instead
        of tying every case of a block."""
        from scipy.optimize import isotonic_regression

        x = np.asarray(features, float)[:, 0]
        t = np.asarray(target, float)
        ux, inverse = np.unique(x, return_inverse=True)
        weights = np.bincount(inverse).astype(float)
        means = np.bincount(inverse, weights=t) / weights
        fitted = isotonic_regression(means, weights=weights, increasing=True).x
        block = np.concatenate([[0], np.cumsum(np.diff(fitted) != 0)])
        w = np.bincount(block, weights=weights)
        self.x = np.bincount(block, weights=weights * ux) / w
        self.y = np.bincount(block, weights=weights * fitted) / w

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The fitted map at feature 0, linear between fitted points, flat beyond them."""
        if self.x.size == 0:
            raise ValueError("the isotonic calibrator is not fitted")
        return np.interp(np.asarray(features, float)[:, 0], self.x, self.y)

    def to_dict(self) -> dict[str, Any]:
        """The fitted points."""
        return {"x": self.x.tolist(), "y": self.y.tolist()}

    def load_dict(self, data: Mapping[str, Any]) -> None:
        """Restore :meth:`to_dict`'s points."""
        self.x = np.asarray(data["x"], float)
        self.y = np.asarray(data["y"], float)
        if self.x.ndim != 1 or self.x.shape != self.y.shape or self.x.size == 0:
            raise ValueError("isotonic calibrator: x and y must be equal, non-empty lists")


class LinearCalibrator:
    """Ridge regression on all features, standardised (``alpha``: the ridge penalty)."""

    def __init__(self, alpha: float = 1.0) -> None:
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.mean: np.ndarray = np.zeros(0)
        self.scale: np.ndarray = np.zeros(0)
        self.coef: np.ndarray = np.zeros(0)
        self.intercept = 0.0

    def fit(self, features: np.ndarray, target: np.ndarray) -> None:
        """Closed-form ridge on standardised features (a constant feature gets weight 0)."""
        x = np.asarray(features, float)
        t = np.asarray(target, float)
        self.mean = x.mean(0)
        std = x.std(0)
        self.scale = np.where(std > 0, std, 1.0)
        z = (x - self.mean) / self.scale
        gram = z.T @ z + self.alpha * np.eye(z.shape[1])
        self.intercept = float(t.mean())
        self.coef = np.linalg.solve(gram, z.T @ (t - self.intercept))

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The fitted linear map."""
        if self.coef.size == 0:
            raise ValueError("the linear calibrator is not fitted")
        z = (np.asarray(features, float) - self.mean) / self.scale
        return z @ self.coef + self.intercept

    def to_dict(self) -> dict[str, Any]:
        """Standardisation, weights and intercept."""
        return {
            "alpha": self.alpha,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
        }

    def load_dict(self, data: Mapping[str, Any]) -> None:
        """Restore :meth:`to_dict`'s state."""
        self.alpha = float(data["alpha"])
        self.mean = np.asarray(data["mean"], float)
        self.scale = np.asarray(data["scale"], float)
        self.coef = np.asarray(data["coef"], float)
        self.intercept = float(data["intercept"])
        if not (self.mean.shape == self.scale.shape == self.coef.shape) or self.coef.ndim != 1:
            raise ValueError("linear calibrator: mean, scale and coef must be equal-length lists")


@hookimpl
def register_calibrators(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register the built-in ``isotonic`` and ``linear`` calibrators."""
    register("isotonic", IsotonicCalibrator)
    register("linear", LinearCalibrator)
