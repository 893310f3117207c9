"""Supervised training: losses decrease, the m_best best checkpoints are kept, training resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcloop.monitor.core.slices import SliceSet
from qcloop.monitor.method.losses import SupervisedLoss, one_hot, weighted_generalised_dice
from qcloop.monitor.method.segmenter_training import (
    TrainSettings,
    ValCase,
    train_segmenter,
    validate,
)
from qcloop.segmenters.bn1 import BN1UNet
from tests.helpers import heart_slices


def _data(n: int = 48, size: int = 64) -> tuple[SliceSet, list[ValCase]]:
    images, labels = heart_slices(n + 8, size=size, seed=1)
    train = SliceSet(images[:n, None], labels[:n])
    val = [ValCase(images[n : n + 4], labels[n : n + 4]), ValCase(images[n + 4 :], labels[n + 4 :])]
    return train, val


def _model() -> BN1UNet:
    torch.manual_seed(0)
    return BN1UNet(base_width=4, max_width=32, depth=4)


def test_weighted_gd_is_zero_for_a_perfect_prediction_and_weights_the_rv() -> None:
    labels = torch.from_numpy(heart_slices(2, 32)[1].astype(np.int64))
    target = one_hot(labels, 4)
    assert float(weighted_generalised_dice(target, target, [0, 1, 1, 2])) == pytest.approx(
        0, abs=1e-4
    )
    # damage only the RV: the loss grows more when the RV weighs more
    damaged = target.clone()
    rv = damaged[:, 3] > 0
    damaged[:, 0][rv], damaged[:, 3][rv] = 1.0, 0.0
    low = float(weighted_generalised_dice(damaged, target, [0, 1, 1, 1]))
    high = float(weighted_generalised_dice(damaged, target, [0, 1, 1, 4]))
    assert 0 < low < high


def test_supervised_loss_handles_deep_supervision_sizes() -> None:
    labels = torch.from_numpy(heart_slices(2, 32)[1].astype(np.int64))
    outs = [torch.randn(2, 4, 32, 32), torch.randn(2, 4, 16, 16)]
    loss = SupervisedLoss()(outs, labels, [0.6, 0.4])
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="deep-supervision"):
        SupervisedLoss()(outs, labels, [1.0])


def test_training_reduces_loss_keeps_m_best_and_resumes(tmp_path) -> None:
    train, val = _data()
    settings = TrainSettings(epochs=6, batch_size=8, m_best=3, seed=0, lr=0.02)
    model = _model()
    before = validate(model, val)
    result = train_segmenter(model, train, val, settings, tmp_path)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert validate(model, val) > before
    assert len(result.checkpoints) == 3
    scores = [c.val_dice for c in result.checkpoints]
    assert scores == sorted(scores, reverse=True)
    # the kept checkpoints are the 3 best validation scores of the history, and only they remain
    history_best = sorted((h["val_dice"] for h in result.history), reverse=True)[:3]
    assert scores == pytest.approx(history_best)
    files = sorted(p.name for p in (tmp_path / "candidates").glob("*.pt"))
    assert files == sorted(c.path.split("/")[-1] for c in result.checkpoints)
    for c in result.checkpoints:
        state = torch.load(tmp_path / c.path, weights_only=True)
        assert state["epoch"] == c.epoch


def test_resume_is_exact(tmp_path) -> None:
    train, val = _data(32)
    settings = TrainSettings(epochs=4, batch_size=8, m_best=2, seed=3, lr=0.02)
    straight = _model()
    train_segmenter(straight, train, val, settings, tmp_path / "a")

    # simulate an interruption after epoch 2: keep a copy of last.pt taken at that point
    def interrupt(metrics: dict, epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmenter(_model(), train, val, settings, tmp_path / "b", log_metrics=interrupt)
    state = torch.load(tmp_path / "b" / "training" / "last.pt", weights_only=True)
    assert state["epoch"] == 1  # the last complete epoch is loadable
    resumed = _model()
    train_segmenter(resumed, train, val, settings, tmp_path / "b")
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    history = torch.load(tmp_path / "b" / "training" / "last.pt", weights_only=True)["history"]
    assert [int(h["epoch"]) for h in history] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("gap", "expected"),
    [(1, [5, 4, 3]), (3, [5, 2]), (2, [5, 3, 1])],
)
def test_candidates_respect_the_epoch_gap(gap, expected) -> None:
    from qcloop.monitor.method.segmenter_training import Checkpoint, spread_candidates

    scores = [0.50, 0.55, 0.70, 0.72, 0.74, 0.80]  # improving: the last epochs are the best
    pool = [Checkpoint(f"e{i}", i, s) for i, s in enumerate(scores)]
    assert [c.epoch for c in spread_candidates(pool, 3, gap)] == expected


def test_training_with_a_gap_keeps_spread_candidates_only(tmp_path) -> None:
    train, val = _data(32)
    settings = TrainSettings(epochs=6, batch_size=8, m_best=2, seed=0, lr=0.02, checkpoint_gap=2)
    result = train_segmenter(_model(), train, val, settings, tmp_path)
    epochs = [c.epoch for c in result.checkpoints]
    assert len(epochs) == 2 and abs(epochs[0] - epochs[1]) >= 2
    files = sorted(p.name for p in (tmp_path / "candidates").glob("*.pt"))
    assert files == sorted(c.path.split("/")[-1] for c in result.checkpoints)
