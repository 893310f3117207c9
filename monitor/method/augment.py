"""Spatial augmentation of training batches: flips, in-plane rotation and isotropic scaling.

Used for the segmenter (images and labels together) and for the QC module (label maps alone).

Applied on the torch batch with one ``affine_grid``/``grid_sample`` call (images bilinear,
labels nearest), so the labels stay exact label values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def random_affine(
    n: int,
    generator: torch.Generator,
    *,
    flip: bool = True,
    rotation_deg: float = 15.0,
    scale: Sequence[float] = (0.85, 1.15),
) -> torch.Tensor:
    """``n`` random ``affine_grid`` matrices ``(n, 2, 3)``: flips, in-plane rotation, scaling."""
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(rotation_deg)
    lo, hi = float(scale[0]), float(scale[1])
    s = lo + torch.rand(n, generator=generator) * (hi - lo)
    # sampling grid maps output to input coordinates: zooming in by s means sampling at 1/s
    inv = 1.0 / s
    cos, sin = torch.cos(angle) * inv, torch.sin(angle) * inv
    fx = torch.ones(n)
    fy = torch.ones(n)
    if flip:
        fx = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        fy = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * fx
    theta[:, 0, 1] = -sin * fy
    theta[:, 1, 0] = sin * fx
    theta[:, 1, 1] = cos * fy
    return theta


def warp_labels(labels: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Label maps ``(N, H, W)`` resampled (nearest) through ``theta``; exact label values."""
    shape = [labels.shape[0], 1, *labels.shape[-2:]]
    grid = F.affine_grid(theta.to(torch.float32), shape, align_corners=False)
    out = F.grid_sample(
        labels[:, None].to(torch.float32),
        grid,
        mode="nearest",
        padding_mode="zeros",
        align_corners=False,
    )[:, 0]
    return out.round().to(labels.dtype)


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    flip: bool = True,
    rotation_deg: float = 15.0,
    scale: Sequence[float] = (0.85, 1.15),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly flip, rotate and scale ``images (N, 1, H, W)`` and ``labels (N, H, W)`` together."""
    theta = random_affine(
        images.shape[0], generator, flip=flip, rotation_deg=rotation_deg, scale=scale
    )
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out_images = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out_images, warp_labels(labels, theta)


def augment_masks(
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    flip: bool = False,
    rotation_deg: float = 0.0,
    scale: Sequence[float] = (1.0, 1.0),
) -> torch.Tensor:
    """Randomly flip, rotate and scale label maps ``(N, H, W)`` (the QC module's training)."""
    theta = random_affine(
        labels.shape[0], generator, flip=flip, rotation_deg=rotation_deg, scale=scale
    )
    return warp_labels(labels, theta)
