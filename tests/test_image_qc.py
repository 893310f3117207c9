"""The image-aware QC module (``image_autoencoder``): its corruptions, its contract, and the
failure it exists for: a plausible heart on the wrong image, which the mask autoencoder
reconstructs faithfully and this module does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcloop.monitor.method.qc_call import QcImageError, call_reconstruct, needs_image
from qcloop.qc_modules.autoencoder import AutoencoderQC
from qcloop.qc_modules.autoencoder_training import CollapseError
from qcloop.qc_modules.image_autoencoder import ImageMaskQC
from qcloop.qc_modules.mask_corruption import corrupt_masks

SMALL = {"input_size": 64, "width_scale": 0.25, "latent_channels": 32, "dropout": 0.1,
         "lr": 2e-3, "batch_size": 8}  # fmt: skip


def hearts(n: int, seed: int, size: int = 64, spread: float = 12) -> tuple[np.ndarray, np.ndarray]:
    """``n`` slices (normalised images, labels) of one heart placed anywhere within ``spread``
    pixels of the centre, so that another slice's mask is a plausible heart in the wrong place."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = np.zeros((n, size, size), np.float32)
    labels = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cx, cy = size / 2 + rng.uniform(-spread, spread, 2)
        r, wall = size * rng.uniform(0.09, 0.12), size * rng.uniform(0.03, 0.05)
        d = np.hypot(xx - cx, yy - cy)
        rv = np.hypot(xx - (cx - 1.3 * (r + wall)), (yy - cy) * 0.8) < r * 1.2
        labels[i][rv & (d > r + wall)] = 3
        labels[i][d < r + wall] = 2
        labels[i][d < r] = 1
        images[i] = np.choose(labels[i], [0.1, 1.0, 0.3, 0.9]) + rng.normal(0, 0.05, (size, size))
    return ((images - images.mean()) / images.std()).astype(np.float32), labels


def rv_dice(a: np.ndarray, b: np.ndarray) -> float:
    p, t = a == 3, b == 3
    return float(2 * (p & t).sum() / max(1, p.sum() + t.sum()))


@pytest.fixture(scope="module")
def trained() -> tuple[ImageMaskQC, AutoencoderQC, np.ndarray, np.ndarray]:
    images, labels = hearts(128, seed=0)
    val_images, val_labels = hearts(32, seed=1)
    image_qc = ImageMaskQC(**SMALL, epochs=8)
    history = image_qc.fit(labels, val_labels, images=images, val_images=val_images, seed=0)
    assert history["dice"]["RV"] > 0.8 and len(history["epochs"]) == 8
    mask_qc = AutoencoderQC(**SMALL, epochs=8)
    mask_qc.fit(labels, val_labels, seed=0)
    return image_qc, mask_qc, val_images, val_labels


def test_a_plausible_heart_on_the_wrong_image_scores_low_only_with_the_image(trained) -> None:
    image_qc, mask_qc, images, labels = trained
    wrong = np.roll(labels, 1, axis=0)  # each image gets the next slice's (good) mask
    n = len(labels)

    def pdc(qc, masks, **kw) -> float:
        recon = call_reconstruct(qc, masks, **kw).argmax(1)
        return float(np.mean([rv_dice(recon[i], masks[i]) for i in range(n)]))

    assert pdc(image_qc, labels, image=images) > 0.8  # a good mask comes back
    assert pdc(image_qc, wrong, image=images) < 0.5  # the wrong one does not
    assert pdc(mask_qc, wrong, image=images) > 0.8  # the mask autoencoder cannot tell


def test_reconstruct_needs_the_image_and_checks_it(trained) -> None:
    image_qc, _, images, labels = trained
    assert needs_image(image_qc) and not needs_image(AutoencoderQC(**SMALL))
    with pytest.raises(QcImageError, match="ImageMaskQC reads the image"):
        call_reconstruct(image_qc, labels)
    with pytest.raises(ValueError, match="none given"):
        image_qc.reconstruct(labels)
    with pytest.raises(ValueError, match=r"image must be \(32, 64, 64\)"):
        image_qc.reconstruct(labels, image=images[:5])
    bad = images.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        image_qc.reconstruct(labels, image=bad)
    out = image_qc.reconstruct(np.eye(4, dtype=np.float32)[labels].transpose(0, 3, 1, 2), images)
    assert out.shape == (32, 4, 64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)


def test_state_round_trip_reconstructs_identically(trained) -> None:
    image_qc, _, images, labels = trained
    again = ImageMaskQC(input_size=64)
    again.load_state_dict(image_qc.state_dict())
    assert again.fitted and again.hparams() == image_qc.hparams()
    np.testing.assert_array_equal(
        again.reconstruct(labels, image=images), image_qc.reconstruct(labels, image=images)
    )
    with pytest.raises(ValueError, match="not an image-aware QC state"):
        again.load_state_dict(AutoencoderQC(**SMALL).state_dict())


def test_fit_refuses_missing_or_mismatched_images() -> None:
    images, labels = hearts(8, seed=2)
    qc = ImageMaskQC(**SMALL, epochs=1)
    with pytest.raises(ValueError, match="needs images beside masks"):
        qc.fit(labels)
    with pytest.raises(ValueError, match="images must be"):
        qc.fit(labels, images=images[:4])
    with pytest.raises(ValueError, match="val_images"):
        qc.fit(labels, labels, images=images)
    with pytest.raises(ValueError, match="corruption"):
        ImageMaskQC(**SMALL, corruption={"clean": 0.0})


def test_a_class_lost_at_the_end_fails_the_fit() -> None:
    images, labels = hearts(8, seed=3)
    qc = ImageMaskQC(**SMALL, epochs=1, collapse_dice=1.01)  # no class can reach it
    with pytest.raises(CollapseError, match="lost classes") as info:
        qc.fit(labels, images=images)
    assert info.value.history["epochs"] and not qc.fitted


def test_each_corruption_does_what_it_says() -> None:
    _, labels = hearts(6, seed=4)
    truth = torch.from_numpy(labels).long()
    before = truth.clone()

    def only(kind: str, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return corrupt_masks(truth, gen, num_classes=4, mix={kind: 1.0}, max_shift=0.2)

    assert torch.equal(only("clean"), truth)
    swapped = only("swap")
    assert all(any(torch.equal(swapped[i], truth[j]) for j in range(6) if j != i) for i in range(6))
    shifted = only("shift")
    assert all(abs(int((shifted[i] > 0).sum()) - int((truth[i] > 0).sum())) < 400 for i in range(6))
    assert not torch.equal(shifted, truth)
    dropped = only("drop")
    assert all(len(set(dropped[i].unique().tolist())) == 3 for i in range(6))  # bg + 2 classes
    morphed = only("morph")
    assert not torch.equal(morphed, truth)
    assert all(set(morphed[i].unique().tolist()) <= {0, 1, 2, 3} for i in range(6))
    assert torch.equal(truth, before)  # the input is never changed
    assert torch.equal(only("swap", 5), only("swap", 5))  # one generator state, one result
