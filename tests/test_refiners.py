"""Refiners: they change the weights, move predictions toward the QC module's pseudo labels on
flagged cases, stop when nothing is OoD, and are seeded-deterministic."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from qcloop.monitor.core.slices import FlaggedSet, SliceSet
from qcloop.monitor.method.losses import one_hot
from qcloop.monitor.method.segmenter_training import (
    TrainSettings,
    ValCase,
    predict_probabilities,
    train_segmenter,
)
from qcloop.plugins.refiners import AlphaRefiner, BlendRefiner
from qcloop.segmenters.bn1 import BN1UNet
from tests.helpers import heart_slices


class OracleQC:
    """A stand-in QC module whose reconstruction is the true mask of the flagged slices (they
    all share one heart): it lets the test check that refinement follows the pseudo label."""

    def __init__(self, label: np.ndarray) -> None:
        self.target = one_hot(torch.from_numpy(label[None].astype(np.int64)), 4).numpy()

    def reconstruct(self, probabilities: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        # refiners pass the case's own slices (what an image-aware QC module reads)
        assert image is not None and image.shape == probabilities[:, 0].shape
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


class NoRvQC(OracleQC):
    """A QC module whose reconstruction has lost the RV (what R returns for a misplaced blob)."""

    def __init__(self, label: np.ndarray) -> None:
        super().__init__(np.where(label == 3, 0, label))


def test_pseudo_labels_missing_a_structure_are_left_out() -> None:
    from qcloop.plugins.refiners import usable_pseudo_labels

    full = np.zeros((3, 8, 8), np.int64)
    full[:, 1, 1], full[:, 2, 2], full[:, 3, 3] = 1, 2, 3
    no_rv = np.where(full == 3, 0, full)
    no_rv[1, 4, 4] = 3  # one slice of the case still has RV: the case is complete
    gone = np.where(full == 3, 0, full)  # no RV in any slice of the case
    pseudo = one_hot(torch.from_numpy(np.concatenate([full, no_rv, gone, full[:1]])), 4)
    flagged = FlaggedSet(images=[np.zeros((3, 8, 8))] * 3 + [np.zeros((1, 8, 8))])
    usable, skipped = usable_pseudo_labels(pseudo, flagged)
    assert skipped == [2]
    assert usable.tolist() == [0, 1, 2, 3, 4, 5, 9]
    usable, skipped = usable_pseudo_labels(pseudo, flagged, skip_incomplete=False)
    assert skipped == [] and usable.tolist() == list(range(10))


def test_refiners_do_not_train_towards_a_pseudo_label_without_rv(setup) -> None:
    """A reconstruction that lost the RV would teach the segmenter to drop it: with every
    flagged case in that state, alpha refines nothing and blend takes no OoD step; with
    ``skip_incomplete=False`` the refiner trains on it."""
    model, x_u, y_u, labelled = setup
    flagged = FlaggedSet(images=[x_u[:8], x_u[8:]])
    m = copy.deepcopy(model)
    history = AlphaRefiner(k_semi=2, seed=0).refine(
        m, NoRvQC(y_u[0]), flagged, labelled, lambda _: 2
    )
    assert history["stopped"] == "no usable pseudo label"
    assert history["epochs"] == [{"epoch": 1, "alpha": 1.0, "skipped_cases": [0, 1]}]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in m.state_dict().items())

    naive = copy.deepcopy(model)
    history = AlphaRefiner(k_semi=1, lr=1e-3, seed=0, skip_incomplete=False).refine(
        naive, NoRvQC(y_u[0]), flagged, labelled, lambda _: 2
    )
    assert history["epochs"][0]["skipped_cases"] == []
    assert any(
        not torch.equal(v, model.state_dict()[k])
        for k, v in naive.state_dict().items()
        if v.is_floating_point()
    )

    sel = [
        one_hot(torch.from_numpy(np.zeros((len(x), 64, 64), np.int64)), 4).numpy()
        for x in flagged.images
    ]
    blend = FlaggedSet(images=flagged.images, selected=sel)
    history = BlendRefiner(epochs=1, max_slices_per_epoch=8, seed=0).refine(
        copy.deepcopy(model), NoRvQC(y_u[0]), blend, labelled, lambda _: 1
    )
    assert history["epochs"][0]["skipped_cases"] == [0, 1]
    assert history["epochs"][0]["ood_loss"] == 0.0


def test_refinement_history_reaches_the_tracker_as_numbers() -> None:
    from qcloop.monitor.method.refine import _log_refinement

    logged: list[tuple[dict[str, float], int | None]] = []

    class Recorder:
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            logged.append((metrics, step))

    history = {
        "ood_before": 2,
        "epochs": [
            {"epoch": 1, "alpha": 1.0, "loss": 0.5, "ood": 1, "skipped_cases": [3]},
            {"epoch": 2, "alpha": 0.5, "skipped_cases": [0, 1]},  # stopped: nothing usable
        ],
    }
    _log_refinement(Recorder(), {"cases": 4, "flagged": 2, "history": [history]})
    assert logged == [
        ({"window_cases": 4.0, "window_ood": 2.0}, None),
        ({"c0.alpha": 1.0, "c0.loss": 0.5, "c0.ood": 1.0, "c0.skipped_cases": 1.0}, 1),
        ({"c0.alpha": 0.5, "c0.skipped_cases": 2.0}, 2),
        ({"c0.ood_before": 2.0, "c0.ood_after": 1.0}, None),
    ]
