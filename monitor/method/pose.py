"""Pose normalisation of the QC module's input: a predicted case is rotated in-plane so that its
heart lies in the pose of the training masks before R reconstructs it, and the reconstruction is
rotated back.

Why: R learns plausible hearts from the training vendor's masks, in the poses that vendor's
planning produced. Another scanner's planning rotates the heart further (the phantom vendor C:
+-40 degrees against A's +-15), and R then scores a correct segmentation as implausible because
of its pose, not its shape. The pose of a case is the direction from the LV centroid to the RV
centroid over its whole stack; the reference is the circular mean of that direction over the
training cases' ground truth, stored with the run (``<VIEW>/pose.json``).

A case without LV or RV has no pose and is reconstructed as it is (it is penalised anyway).
Hand-written: the rotation is one ``grid_sample`` call on the case's probability maps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor import STRUCTURES
from qcloop.monitor.method.qc_call import call_reconstruct

__all__ = [
    "PoseReference",
    "case_angle",
    "load_pose",
    "reconstruct_posed",
    "reference_angle",
    "rotate_image",
    "rotate_maps",
]

POSE_FILE = "pose.json"


def case_angle(labels: np.ndarray) -> float | None:
    """Direction (radians, atan2 of rows over columns) from the LV to the RV centroid of a label
    stack ``(Z, H, W)`` or slice ``(H, W)``; ``None`` when LV or RV is absent."""
    labels = np.asarray(labels)
    lv = np.argwhere(labels == STRUCTURES["LV"])
    rv = np.argwhere(labels == STRUCTURES["RV"])
    if len(lv) == 0 or len(rv) == 0:
        return None
    dy, dx = rv[:, -2:].mean(0) - lv[:, -2:].mean(0)
    if dy == 0 and dx == 0:
        return None
    return math.atan2(float(dy), float(dx))


def reference_angle(stacks: Sequence[np.ndarray]) -> float:
    """Reference pose of ground-truth stacks: the circular mean of their angles (the direction
    of the mean unit vector, so the wrap at +-pi does no harm); ``ValueError`` when no stack
    shows both LV and RV."""
    angles = [a for a in (case_angle(s) for s in stacks) if a is not None]
    if not angles:
        raise ValueError("no training case shows both LV and RV: no reference pose")
    return math.atan2(float(np.mean(np.sin(angles))), float(np.mean(np.cos(angles))))


def rotate_maps(maps: np.ndarray, delta: float) -> np.ndarray:
    """Probability maps ``(Z, C, H, W)`` rotated in-plane by ``delta`` radians about the centre
    (a case's :func:`case_angle` grows by ``delta``); uncovered corners become background."""
    out = _rotate(maps, delta)
    out[:, 0] += 1.0 - out.sum(1)  # the mass sampled from outside the image is background
    return out


def rotate_image(image: np.ndarray, delta: float) -> np.ndarray:
    """Prepared slices ``(Z, H, W)`` rotated as :func:`rotate_maps` turns their maps; uncovered
    corners become 0 (the mean of a normalised image)."""
    return _rotate(image[:, None], delta)[:, 0]


def _rotate(x_np: np.ndarray, delta: float) -> np.ndarray:
    """``(Z, C, H, W)`` rotated by ``delta`` radians (bilinear, zeros outside)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float32))
    if x.ndim != 4:
        raise ValueError(f"expected maps (Z, C, H, W), got shape {tuple(x.shape)}")
    c, s = math.cos(delta), math.sin(delta)
    # affine_grid maps output to input coordinates: sampling at R(-delta) rotates by +delta
    theta = torch.tensor([[c, s, 0.0], [-s, c, 0.0]], dtype=torch.float32)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.numpy()


@dataclass(frozen=True)
class PoseReference:
    """The reference pose of one view (radians) and how many training cases gave it."""

    angle: float
    n_cases: int

    def reconstruct(
        self,
        reconstruct: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
        probabilities: np.ndarray,
        image: np.ndarray | None = None,
    ) -> np.ndarray:
        """``reconstruct(maps, image)`` of one case's maps ``(Z, C, H, W)`` taken in the
        reference pose and returned in the case's own pose; the case's image ``(Z, H, W)``, when
        given, is turned with the maps."""
        angle = case_angle(probabilities.argmax(1))
        if angle is None:
            return reconstruct(probabilities, image)
        delta = _wrap(self.angle - angle)
        posed_image = None if image is None else rotate_image(image, delta)
        recon = reconstruct(rotate_maps(probabilities, delta), posed_image)
        return rotate_maps(recon, -delta)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (degrees, for people reading ``pose.json``)."""
        return {"reference_angle_deg": math.degrees(self.angle), "n_cases": self.n_cases}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoseReference:
        """Inverse of :meth:`to_dict`."""
        return cls(angle=math.radians(float(d["reference_angle_deg"])), n_cases=int(d["n_cases"]))

    @classmethod
    def from_ground_truth(cls, stacks: Sequence[np.ndarray]) -> PoseReference:
        """The reference pose of training ground-truth stacks ``(Z, H, W)``."""
        return cls(angle=reference_angle(stacks), n_cases=len(stacks))


def reconstruct_posed(
    qc: Any,
    probabilities: np.ndarray,
    pose: PoseReference | None,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """The QC module's (or runtime's) reconstruction of one case's maps, taken in ``pose`` when
    one is given; ``image`` (the case's prepared slices) reaches a module that reads it."""
    if pose is None:
        return call_reconstruct(qc, probabilities, image)
    return pose.reconstruct(partial(call_reconstruct, qc), probabilities, image)


def load_pose(run: str | Path, view: str) -> PoseReference | None:
    """The reference pose of ``view`` saved in run folder ``run``; ``None`` when absent."""
    path = Path(run) / view / POSE_FILE
    if not path.exists():
        return None
    return PoseReference.from_dict(json.loads(path.read_text()))


def _wrap(angle: float) -> float:
    """``angle`` in (-pi, pi]."""
    return math.atan2(math.sin(angle), math.cos(angle))
