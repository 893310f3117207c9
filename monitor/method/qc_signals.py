"""QC signals beside pDC/pHD, for the calibrated quality estimate
(:mod:`~qcloop.monitor.method.quality_estimate`): what the segmenters themselves say about a
case.

* ``entropy``: per candidate and structure, the mean normalised softmax entropy (0: certain,
  1: uniform over the classes) over the voxels the candidate labels as that structure; 1 for a
  structure it does not predict.
* ``agreement``: per structure, the mean Dice between every pair of candidates' label maps
  (the m_best candidates' disagreement; 1 with a single candidate).

Both cost a few element-wise passes over maps the assessor already holds (measured with
``qcloop bench loop``).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np

from qcloop.monitor import STRUCTURES

__all__ = ["ENTROPY_DECIMALS", "case_signals"]

#: Entropy is kept to this many decimals: softmax maps differ in their last float32 bits with
#: the number of torch threads (a Ray actor runs one, the local engine all), and a record must
#: not depend on the engine that scored it.
ENTROPY_DECIMALS = 4


def _entropy(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean normalised entropy per structure of one candidate's maps ``(Z, C, S, S)``."""
    p = np.clip(probs, 1e-12, 1.0)
    voxel = -(p * np.log(p)).sum(1) / np.log(probs.shape[1])  # (Z, S, S)
    out = {}
    for name, label in STRUCTURES.items():
        inside = labels == label
        out[name] = round(float(voxel[inside].mean()), ENTROPY_DECIMALS) if inside.any() else 1.0
    return out


def _agreement(labels: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean pairwise Dice per structure among the candidates' label maps."""
    out = {}
    for name, label in STRUCTURES.items():
        masks = [lab == label for lab in labels]
        pairs = []
        for a, b in combinations(masks, 2):
            total = int(a.sum()) + int(b.sum())
            pairs.append(1.0 if total == 0 else 2.0 * int((a & b).sum()) / total)
        out[name] = float(np.mean(pairs)) if pairs else 1.0
    return out


def case_signals(probs: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> dict[str, Any]:
    """The signals of one case: ``{"entropy": [per candidate {structure: value}],
    "agreement": {structure: value}}`` from each candidate's softmax maps and label maps."""
    return {
        "entropy": [_entropy(p, lab) for p, lab in zip(probs, labels, strict=True)],
        "agreement": _agreement(labels),
    }
