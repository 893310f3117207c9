"""Refiners: they change the weights, move predictions toward the QC module's pseudo labels on
flagged cases, stop when nothing is OoD, and are seeded-deterministic."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from qcloop.monitor.losses import one_hot
from qcloop.monitor.training import (
    SliceSet,
    TrainSettings,
    ValCase,
    predict_probabilities,
    train_segmenter,
)
from qcloop.plugins.refiners import AlphaRefiner, BlendRefiner, FlaggedSet
from qcloop.segmenters.bn1 import BN1UNet
from tests.helpers import heart_slices


class OracleQC:
    """A stand-in QC module whose reconstruction is the true mask of the flagged slices (they
    all share one heart): it lets the test check that refinement follows the pseudo label."""

    def __init__(self, label: np.ndarray) -> None:
        self.target = one_hot(torch.from_numpy(label[None].astype(np.int64)), 4).numpy()

    def reconstruct(self, probabilities: np.ndarray) -> np.ndarray:
        return np.repeat(self.target, len(probabilities), axis=0)


def _dice(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    pred = predict_probabilities(model, images).argmax(1)
    return float(
        np.mean(
            [
                2
                * ((pred == k) & (labels == k)).sum()
                / max((pred == k).sum() + (labels == k).sum(), 1)
                for k in (1, 2, 3)
            ]
        )
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    images, labels = heart_slices(40, size=64, seed=2)
    torch.manual_seed(0)
    model = BN1UNet(base_width=4, max_width=32, depth=4)
    train_segmenter(
        model,
        SliceSet(images[:32, None], labels[:32]),
        [ValCase(images[32:], labels[32:])],
        TrainSettings(epochs=5, batch_size=8, m_best=1, lr=0.02),
        tmp_path_factory.mktemp("m"),
    )
    shifted_images, shifted_labels = heart_slices(16, size=64, seed=7)
    shifted_images = np.ascontiguousarray(
        0.5 * shifted_images**2 - 0.5, dtype=np.float32
    )  # a gamma-like shift
    labelled = SliceSet(images[:32, None], labels[:32])
    return model, shifted_images, shifted_labels, labelled


def test_alpha_refiner_follows_pseudo_labels_and_is_deterministic(setup) -> None:
    model, x_u, y_u, labelled = setup
    flagged = FlaggedSet(images=[x_u[:8], x_u[8:]])
    before = _dice(model, x_u, y_u)
    counts = []

    def still_ood(m: torch.nn.Module) -> int:
        counts.append(1)
        return 2  # never satisfied: run all k_semi epochs

    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        history = AlphaRefiner(k_semi=3, lr=1e-3, seed=5).refine(
            m, OracleQC(y_u[0]), flagged, labelled, still_ood
        )
        runs.append(m)
        assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3]
        assert [e["alpha"] for e in history["epochs"]] == pytest.approx([1, 1 / 2, 1 / 3])
    a, b = (r.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights
    orig = model.state_dict()
    assert any(not torch.equal(a[k], orig[k]) for k in a if a[k].is_floating_point())
    assert _dice(runs[0], x_u, y_u) > before  # predictions moved toward the pseudo labels


def test_alpha_refiner_stops_when_nothing_is_ood(setup) -> None:
    model, x_u, y_u, labelled = setup
    m = copy.deepcopy(model)
    calls = iter([3, 0])  # before refinement: 3 OoD; after epoch 1: none
    history = AlphaRefiner(k_semi=5, seed=0).refine(
        m, OracleQC(y_u[0]), FlaggedSet([x_u]), labelled, lambda _: next(calls)
    )
    assert len(history["epochs"]) == 1 and history["stopped"] == "no OoD case left"
    untouched = copy.deepcopy(model)
    history = AlphaRefiner(k_semi=5).refine(
        untouched, OracleQC(y_u[0]), FlaggedSet([x_u]), labelled, lambda _: 0
    )
    assert history["epochs"] == [] and all(
        torch.equal(v, model.state_dict()[k]) for k, v in untouched.state_dict().items()
    )


def test_blend_refiner_changes_weights_deterministically(setup) -> None:
    model, x_u, y_u, labelled = setup
    sel = [
        one_hot(torch.from_numpy(y_u[:8].astype(np.int64)), 4).numpy(),
        one_hot(torch.from_numpy(y_u[8:].astype(np.int64)), 4).numpy(),
    ]
    flagged = FlaggedSet(images=[x_u[:8], x_u[8:]], selected=sel)
    states = []
    for _ in range(2):
        m = copy.deepcopy(model)
        history = BlendRefiner(epochs=2, max_slices_per_epoch=16, seed=1).refine(
            m, OracleQC(y_u[0]), flagged, labelled, lambda _: 1
        )
        assert len(history["epochs"]) == 2
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(
        not torch.equal(states[0][k], v)
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    )
    with pytest.raises(ValueError, match="QC-selected"):
        BlendRefiner().refine(
            copy.deepcopy(model), OracleQC(y_u[0]), FlaggedSet([x_u]), labelled, lambda _: 1
        )
