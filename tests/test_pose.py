"""Pose normalisation: the LV->RV direction of a case, rotations that move it by the asked
angle, the reference pose (wrap-safe), and a reconstruction taken in the reference pose and
returned in the case's own."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.method.pose import PoseReference, case_angle, reference_angle, rotate_maps
from qcloop.monitor.method.run_folder import RunError, configured_pose

S = 64


def heart(angle: float, z: int = 3) -> np.ndarray:
    """A label stack ``(z, S, S)``: LV disc, MYO ring, RV disc at ``angle`` from the LV."""
    yy, xx = np.mgrid[:S, :S].astype(np.float64)
    cy = cx = S / 2
    d = np.hypot(yy - cy, xx - cx)
    ry, rx = cy + 16 * math.sin(angle), cx + 16 * math.cos(angle)
    lab = np.zeros((S, S), np.int64)
    lab[np.hypot(yy - ry, xx - rx) < 8] = 3
    lab[d < 10] = 2
    lab[d < 7] = 1
    return np.repeat(lab[None], z, axis=0)


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(4, dtype=np.float32)[labels].transpose(0, 3, 1, 2).copy()


def _diff(a: float, b: float) -> float:
    return abs(math.atan2(math.sin(a - b), math.cos(a - b)))


@pytest.mark.parametrize("angle", [0.0, math.pi / 2, -2.5, 3.0])
def test_case_angle_points_from_lv_to_rv(angle: float) -> None:
    assert _diff(case_angle(heart(angle)), angle) < math.radians(2)


def test_no_pose_without_lv_or_rv() -> None:
    no_rv = np.where(heart(0.0) == 3, 0, heart(0.0))
    assert case_angle(no_rv) is None and case_angle(np.zeros((2, S, S), int)) is None


@pytest.mark.parametrize("delta", [math.radians(40), math.radians(-75), math.pi])
def test_rotation_moves_the_angle_by_delta_and_keeps_probabilities(delta: float) -> None:
    maps = one_hot(heart(0.3))
    out = rotate_maps(maps, delta)
    assert out.shape == maps.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)
    assert _diff(case_angle(out.argmax(1)), 0.3 + delta) < math.radians(3)
    back = rotate_maps(out, -delta).argmax(1)
    assert (back == maps.argmax(1)).mean() > 0.99


def test_reference_angle_is_wrap_safe() -> None:
    stacks = [heart(math.pi - 0.1), heart(-math.pi + 0.1), heart(math.pi)]
    assert _diff(reference_angle(stacks), math.pi) < math.radians(2)
    with pytest.raises(ValueError, match="reference pose"):
        reference_angle([np.zeros((1, S, S), int)])


def test_reconstruction_is_taken_in_the_reference_pose_and_returned() -> None:
    pose = PoseReference.from_ground_truth([heart(-1.2), heart(-1.0)])
    assert pose.n_cases == 2 and _diff(pose.angle, -1.1) < math.radians(2)
    assert PoseReference.from_dict(pose.to_dict()) == pytest.approx(pose)
    seen: list[float] = []

    images: list[np.ndarray | None] = []

    def identity(maps: np.ndarray, image: np.ndarray | None) -> np.ndarray:
        seen.append(case_angle(maps.argmax(1)))
        images.append(image)
        return maps

    case = one_hot(heart(0.8))
    recon = pose.reconstruct(identity, case)
    assert _diff(seen[0], pose.angle) < math.radians(3)  # R saw the reference pose
    assert (recon.argmax(1) == case.argmax(1)).mean() > 0.99  # returned in the case's pose
    assert images == [None]  # a mask-only module gets no image
    no_rv = one_hot(np.where(heart(0.8) == 3, 0, heart(0.8)))
    assert pose.reconstruct(identity, no_rv) is no_rv  # no pose: reconstructed as it is

    # an image-aware module sees the image turned with the maps: its RV-bright pixels lie
    # where the turned maps put the RV
    image = np.where(heart(0.8) == 3, 1.0, 0.0).astype(np.float32)
    pose.reconstruct(identity, case, image)
    turned_rv = images[-1] > 0.5
    assert _diff(seen[-1], pose.angle) < math.radians(3)
    assert turned_rv.any()
    overlap = (turned_rv & (rotate_maps(case, pose.angle - 0.8).argmax(1) == 3)).sum()
    assert overlap / turned_rv.sum() > 0.9


def test_configured_pose_follows_the_option() -> None:
    pose = PoseReference(angle=0.5, n_cases=3)
    off = QcloopConfig()
    on = QcloopConfig.model_validate({"assessment": {"pose_normalisation": True}})
    assert configured_pose(off, pose, "SA") is None
    assert configured_pose(on, pose, "SA") is pose
    with pytest.raises(RunError, match=r"SA/pose\.json"):
        configured_pose(on, None, "SA")
