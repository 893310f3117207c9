"""Spatial augmentation: label maps keep exact label values and their area under rotation, the
image and its labels move together, the QC module's mask-only path draws the same poses, and
everything is seeded."""

from __future__ import annotations

import numpy as np
import torch

from qcloop.monitor.method.augment import augment_batch, augment_masks
from tests.helpers import heart_slices


def _labels(n: int = 8) -> torch.Tensor:
    return torch.from_numpy(heart_slices(n, size=64, seed=4)[1].astype(np.int64))


def test_masks_keep_label_values_and_area_under_rotation() -> None:
    labels = _labels()
    out = augment_masks(labels, torch.Generator().manual_seed(0), rotation_deg=180)
    assert out.dtype == labels.dtype and out.shape == labels.shape
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())
    assert not torch.equal(out, labels)
    for k in (1, 2, 3):  # nearest resampling of a rotation keeps each structure's area
        before, after = (labels == k).sum().item(), (out == k).sum().item()
        assert abs(after - before) <= 0.05 * before, (k, before, after)


def test_masks_unchanged_when_augmentation_is_off() -> None:
    labels = _labels()
    assert torch.equal(augment_masks(labels, torch.Generator().manual_seed(0)), labels)


def test_seeded_and_shared_with_the_segmenter_batch() -> None:
    labels = _labels()
    kwargs = {"flip": True, "rotation_deg": 40.0, "scale": (0.8, 1.2)}
    first = augment_masks(labels, torch.Generator().manual_seed(3), **kwargs)
    again = augment_masks(labels, torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(first, again)
    # the image (here: the RV indicator) and the labels move together
    image = (labels == 3).to(torch.float32)[:, None]
    images, batch_labels = augment_batch(image, labels, torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(batch_labels, first)
    agree = ((images[:, 0] > 0.5) == (batch_labels == 3)).to(torch.float32).mean().item()
    assert agree > 0.99
