"""QC module R: architecture sizing, training quality, pseudo-Dice ranking of corrupted masks,
collapse detection and escape, input modes, persistence and seeded determinism."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from qcloop.monitor.core.interfaces import QCModule
from qcloop.qc_modules.autoencoder import AutoencoderQC, CollapseError, stage_widths

SIZE = 64
EPOCHS = 8
FAST = {
    "input_size": SIZE,
    "width_scale": 0.25,
    "latent_channels": 32,
    "dropout": 0.1,
    "lr": 2e-3,
    "batch_size": 8,
}


# ------------------------------------------------------------------ synthetic hearts


def heart_masks(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    """Short-axis-like masks: LV disc, MYO ring, RV crescent on the left, random pose and size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        r_lv = rng.uniform(0.09, 0.14) * size
        r_out = r_lv + rng.uniform(0.04, 0.06) * size
        ecc = rng.uniform(0.85, 1.15)
        angle = rng.uniform(-0.5, 0.5)
        cy, cx = rng.uniform(0.4, 0.6, 2) * size
        u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
        v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
        rho = np.hypot(u / ecc, v * ecc)
        shift = -r_out * rng.uniform(0.7, 0.9)
        rv_u, rv_v = rng.uniform(1.2, 1.6) * r_out, rng.uniform(0.9, 1.2) * r_out
        rv = (((u - shift) / rv_u) ** 2 + (v / rv_v) ** 2 <= 1) & (rho > r_out + 1.0)
        out[i][rv] = 3
        out[i][rho <= r_out] = 2
        out[i][rho <= r_lv] = 1
    return out


def one_hot(masks: np.ndarray, c: int = 4) -> np.ndarray:
    return np.eye(c, dtype=np.float32)[masks].transpose(0, 3, 1, 2).copy()


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    """Dice of one label between two label maps; 1 when both lack it."""
    x, y = a == label, b == label
    total = x.sum() + y.sum()
    return 1.0 if total == 0 else 2.0 * (x & y).sum() / total


def pseudo_dice(qc: AutoencoderQC, masks: np.ndarray) -> np.ndarray:
    """Per case: mean foreground Dice between a mask and the argmax of its reconstruction."""
    recon = qc.reconstruct(one_hot(masks)).argmax(axis=1)
    return np.array(
        [np.mean([dice(m, r, k) for k in (1, 2, 3)]) for m, r in zip(masks, recon, strict=True)]
    )


def corrupt(masks: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """Implausible versions of ``masks``: holes punched, blobs added, LV/RV swapped, RV halved."""
    rng = np.random.default_rng(seed)
    out = masks.copy()
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for m in out:
        if kind == "holes":
            ys, xs = np.nonzero(m > 0)
            for j in rng.choice(len(ys), 3, replace=False):
                m[(yy - ys[j]) ** 2 + (xx - xs[j]) ** 2 <= 9] = 0
        elif kind == "blobs":
            for label in (1, 2, 3):
                ys, xs = np.nonzero(m == 0)
                j = rng.integers(len(ys))
                m[((yy - ys[j]) ** 2 + (xx - xs[j]) ** 2 <= 16) & (m == 0)] = label
        elif kind == "swap":
            lv, rv = m == 1, m == 3
            m[lv], m[rv] = 3, 1
        elif kind == "half_rv":
            ys, _ = np.nonzero(m == 3)
            m[(m == 3) & (yy < np.median(ys))] = 0
    return out


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny networks train several times faster on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def train_masks() -> np.ndarray:
    return heart_masks(256, seed=1)


@pytest.fixture(scope="module")
def test_masks() -> np.ndarray:
    return heart_masks(48, seed=3)


@pytest.fixture(scope="module")
def trained(train_masks):
    calls: list[tuple[dict[str, float], int]] = []
    qc = AutoencoderQC(**FAST, epochs=EPOCHS, collapse_warmup=4)
    history = qc.fit(
        train_masks, heart_masks(64, seed=2), seed=0, log=lambda m, s: calls.append((m, s))
    )
    return qc, history, calls


# ------------------------------------------------------------------ architecture


def test_widths_sized_from_input_size():
    assert stage_widths(256) == (32, 32, 32, 64, 128)
    assert stage_widths(128) == (32, 32, 64, 128)
    assert stage_widths(64) == (32, 64, 128)
    assert stage_widths(512) == (32, 32, 32, 32, 64, 128)
    assert stage_widths(64, width_scale=0.25) == (8, 16, 32)
    for bad in (96, 8, 0):
        with pytest.raises(ValueError):
            stage_widths(bad)
    with pytest.raises(ValueError):
        AutoencoderQC(input_size=64, widths=(8, 8))


@pytest.mark.parametrize("size", [64, 128, 256])
def test_latent_is_4x4_and_output_is_softmax(size):
    qc = AutoencoderQC(input_size=size, width_scale=0.125, latent_channels=8)
    x = torch.rand(2, 4, size, size)
    assert qc.net.encoder(x).shape == (2, 8, 4, 4)
    y = qc.net.eval()(x)
    assert y.shape == (2, 4, size, size)
    torch.testing.assert_close(y.sum(dim=1), torch.ones(2, size, size))
    assert isinstance(qc, QCModule)


def test_plugin_factory_builds_the_component():
    from qcloop.qc_modules.plugin import _autoencoder

    qc = _autoencoder(input_size=64, width_scale=0.25, input="onehot")
    assert isinstance(qc, AutoencoderQC) and qc.input == "onehot"


def test_invalid_arguments_are_rejected(train_masks):
    with pytest.raises(ValueError):
        AutoencoderQC(input="logits")
    with pytest.raises(ValueError, match="augment_rotation_deg"):
        AutoencoderQC(augment_rotation_deg=200)
    with pytest.raises(ValueError, match="augment_scale"):
        AutoencoderQC(augment_scale=(1.2, 0.9))
    qc = AutoencoderQC(**FAST, epochs=1)
    with pytest.raises(ValueError):
        qc.fit(train_masks[:, :32, :32])
    with pytest.raises(ValueError):
        qc.fit(train_masks.astype(np.float32))
    with pytest.raises(ValueError):
        qc.fit(np.full((2, SIZE, SIZE), 4, np.uint8))
    with pytest.raises(ValueError):
        qc.reconstruct(np.zeros((1, 4, 32, 32), np.float32))


# ------------------------------------------------------------------ training quality


def test_loss_decreases_and_held_out_masks_are_reconstructed(trained, test_masks):
    qc, history, calls = trained
    assert history["collapse_events"] == [] and history["attempts"] == 1
    assert len(history["loss"]) == EPOCHS and history["monitor"] == "val"
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    recon = qc.reconstruct(one_hot(test_masks)).argmax(axis=1)
    got = {
        k: np.mean([dice(m, r, k) for m, r in zip(test_masks, recon, strict=True)])
        for k in (1, 2, 3)
    }
    assert got[1] > 0.85 and got[3] > 0.8 and got[2] > 0.6, got
    # every epoch reached the tracker, finite, with per-structure names
    assert [s for _, s in calls] == list(range(1, EPOCHS + 1))
    assert all(math.isfinite(v) for m, _ in calls for v in m.values())
    assert {"qc/loss", "qc/mse", "qc/gd", "qc/dice_LV", "qc/dice_MYO", "qc/dice_RV"} <= set(
        calls[0][0]
    )


@pytest.mark.parametrize("kind", ["holes", "blobs", "swap", "half_rv"])
def test_pseudo_dice_ranks_corrupted_masks_below_clean_ones(trained, test_masks, kind):
    qc = trained[0]
    clean = pseudo_dice(qc, test_masks)
    broken = pseudo_dice(qc, corrupt(test_masks, kind, seed=4))
    assert broken.mean() < clean.mean() - 0.03, (kind, clean.mean(), broken.mean())
    assert np.mean(clean > broken) >= 0.9, (kind, clean, broken)


# ------------------------------------------------------------------ collapse

#: these tests count warm-up and patience in epochs only
NO_STEP_FLOORS = {"collapse_warmup_steps": 0, "collapse_patience_steps": 0}


def test_step_floors_delay_collapse_checks_on_small_mask_sets(train_masks):
    # 16 masks at batch 8 are 2 steps an epoch: with a 60-step warm-up floor the deliberate
    # collapse is first judged at epoch 30, not at the nominal warm-up epoch 2
    qc = AutoencoderQC(**FAST, epochs=31, collapse_warmup=2, collapse_patience=1)
    history = qc.fit(train_masks[:16], seed=0, start_collapsed=True)
    assert history["collapse_events"][0]["epoch"] == 30


def test_collapse_is_detected_and_escaped_by_a_restart(train_masks, test_masks):
    qc = AutoencoderQC(**FAST, epochs=8, collapse_warmup=4, collapse_patience=1, **NO_STEP_FLOORS)
    history = qc.fit(train_masks[:128], seed=0, start_collapsed=True)
    events = history["collapse_events"]
    # all-background is detected after the warm-up; the balanced loss cannot pull a saturated
    # softmax back, so after the patience the ladder restarts from a new seed
    assert [(e["attempt"], e["epoch"], e["action"]) for e in events[:2]] == [
        (0, 4, "balanced_loss"),
        (0, 5, "restart"),
    ]
    assert events[0]["classes"] == ["LV", "MYO", "RV"]
    assert events[0]["dice"] == {"LV": 0.0, "MYO": 0.0, "RV": 0.0}
    assert all(e["action"] == "restart" for e in events[1:])
    assert history["attempts"] == len(events) and history["attempts"] >= 2
    assert history["balanced_loss"] and history["monitor"] == "train"
    assert [e["attempt"] for e in history["epochs"][:5]] == [0] * 5
    assert [e["attempt"] for e in history["epochs"][-8:]] == [history["attempts"] - 1] * 8
    recon = qc.reconstruct(one_hot(test_masks)).argmax(axis=1)
    got = {
        k: np.mean([dice(m, r, k) for m, r in zip(test_masks, recon, strict=True)])
        for k in (1, 2, 3)
    }
    assert min(got.values()) > 0.5 and got[3] > 0.7, got


def test_pathological_lr_collapses_and_raises(train_masks):
    qc = AutoencoderQC(
        **{**FAST, "lr": 10.0},
        epochs=3,
        collapse_warmup=1,
        collapse_patience=1,
        max_restarts=1,
        **NO_STEP_FLOORS,
    )
    with pytest.raises(CollapseError, match="collapsed") as err:
        qc.fit(train_masks[:96], seed=0)
    events = err.value.history["collapse_events"]
    assert [e["action"] for e in events] == ["balanced_loss", "restart", "give_up"]
    assert events[-1]["classes"] and not qc.fitted


def test_deliberate_collapse_without_restarts_raises(train_masks):
    qc = AutoencoderQC(**FAST, epochs=2, collapse_warmup=1, collapse_patience=1, max_restarts=0)
    with pytest.raises(CollapseError):
        qc.fit(train_masks[:64], seed=0, start_collapsed=True)


# ------------------------------------------------------------------ inference API


def soft_probabilities(masks: np.ndarray) -> np.ndarray:
    """Segmenter-like softmax maps: confident inside structures, uncertain at their borders."""
    logits = 3.0 * gaussian_filter(one_hot(masks), sigma=(0, 0, 1, 1))
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def test_input_modes(trained, test_masks):
    state = trained[0].state_dict()
    soft = AutoencoderQC.from_state_dict(state)
    hard = AutoencoderQC.from_state_dict(
        {**state, "hparams": {**state["hparams"], "input": "onehot"}}
    )
    masks = test_masks[:16]
    probs = soft_probabilities(masks)
    assert probs.max(axis=1).mean() < 0.9  # really soft
    from_argmax = soft.reconstruct(one_hot(probs.argmax(axis=1)))
    # one-hot mode sees only the argmax; softmax mode sees the soft maps
    assert np.array_equal(hard.reconstruct(probs), from_argmax)
    assert not np.allclose(soft.reconstruct(probs), from_argmax, atol=1e-3)
    # integer label masks are accepted as one-hot input
    assert np.array_equal(soft.reconstruct(masks), soft.reconstruct(one_hot(masks)))
    for out in (soft.reconstruct(probs), hard.reconstruct(probs)):
        assert out.dtype == np.float32 and np.isfinite(out).all()
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
        labels = out.argmax(axis=1)
        assert np.mean([dice(m, r, 3) for m, r in zip(masks, labels, strict=True)]) > 0.8


def test_reconstruct_tensor_is_detached_and_matches_numpy(trained, test_masks):
    qc = trained[0]
    x = torch.from_numpy(one_hot(test_masks[:4])).double().requires_grad_(True)
    y = qc.reconstruct_tensor(x)
    assert not y.requires_grad and y.dtype == torch.float64 and not qc.net.training
    np.testing.assert_allclose(y.numpy(), qc.reconstruct(one_hot(test_masks[:4])), atol=1e-6)


def test_save_load_round_trip(trained, test_masks, tmp_path):
    qc = trained[0]
    path = tmp_path / "qc.pt"
    qc.save(path)
    assert os.listdir(tmp_path) == ["qc.pt"]
    loaded = AutoencoderQC.load(path)
    assert loaded.hparams() == qc.hparams() and loaded.fitted
    x = one_hot(test_masks[:8])
    assert np.array_equal(loaded.reconstruct(x), qc.reconstruct(x))
    # an instance of another shape adopts the saved architecture
    other = AutoencoderQC(input_size=128, width_scale=0.125, latent_channels=8)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.widths == qc.widths and np.array_equal(other.reconstruct(x), qc.reconstruct(x))


def test_same_seed_gives_identical_weights(train_masks):
    def weights(seed: int) -> dict[str, torch.Tensor]:
        # thresholds of 0 switch collapse detection off for this two-epoch run
        qc = AutoencoderQC(**FAST, epochs=2, collapse_dice=0.0, collapse_fraction=0.0)
        qc.fit(train_masks[:96], seed=seed)
        return qc.net.state_dict()

    rng_before = torch.get_rng_state()
    first, again, other = weights(0), weights(0), weights(1)
    assert torch.equal(rng_before, torch.get_rng_state())  # the caller's RNG is untouched
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_pose_augmentation_accepts_a_heart_in_an_unseen_pose(trained, train_masks, test_masks):
    """The training hearts lie within +-29 degrees of one pose. Rotated by 90 degrees, correct
    masks look implausible to R trained on them as they are; R trained with rotation
    augmentation scores them like unrotated ones and still ranks corrupted masks below."""
    rotated = np.rot90(test_masks, 1, axes=(1, 2)).copy()
    plain = trained[0]
    posed = AutoencoderQC(**FAST, epochs=EPOCHS, collapse_warmup=4, augment_rotation_deg=180)
    history = posed.fit(train_masks, heart_masks(64, seed=2), seed=0)
    assert posed.hparams()["augment_rotation_deg"] == 180 and history["collapse_events"] == []
    plain_rotated = pseudo_dice(plain, rotated).mean()
    posed_rotated = pseudo_dice(posed, rotated).mean()
    posed_upright = pseudo_dice(posed, test_masks).mean()
    assert posed_rotated > plain_rotated + 0.1, (plain_rotated, posed_rotated)
    assert abs(posed_rotated - posed_upright) < 0.05, (posed_rotated, posed_upright)
    broken = pseudo_dice(posed, corrupt(rotated, "blobs", seed=5)).mean()
    assert broken < posed_rotated - 0.05, (broken, posed_rotated)
