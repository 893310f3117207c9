"""Corrupted training masks for the image-aware QC module: the failures a deployed segmenter
makes, drawn on ground truth, so that the module learns to restore the mask the image shows.

One corruption per mask, drawn with fixed probabilities:

- ``clean``: the ground truth itself (a good segmentation must come back unchanged);
- ``swap``: another slice's ground truth, a plausible heart on the wrong image (the failure a
  mask-only autoencoder cannot see);
- ``shift``: the mask moved in-plane (a heart segmented beside where it is);
- ``drop``: one structure erased (a missed RV);
- ``morph``: one structure grown or shrunk by a few pixels (over- and under-segmentation).

Hand-written (a few tensor operations on label masks); MONAI's transforms act on images, not on
what a wrong segmentation looks like.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = ["CORRUPTIONS", "DEFAULT_MIX", "corrupt_masks"]

CORRUPTIONS = ("clean", "swap", "shift", "drop", "morph")
#: Default probability of each corruption.
DEFAULT_MIX: dict[str, float] = {"clean": 0.2, "swap": 0.3, "shift": 0.2, "drop": 0.1, "morph": 0.2}


def corrupt_masks(
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    num_classes: int,
    mix: Mapping[str, float] = DEFAULT_MIX,
    max_shift: float = 0.15,
    max_morph: int = 4,
) -> torch.Tensor:
    """Corrupted copies of label masks ``(N, H, W)`` (int), one corruption each, drawn from
    ``mix``; ``max_shift``: the largest in-plane shift as a fraction of the side; ``max_morph``:
    the largest growth or shrinkage in pixels. The input is not changed."""
    names = [k for k in CORRUPTIONS if mix.get(k, 0) > 0]
    weights = torch.tensor([float(mix[k]) for k in names])
    kinds = torch.multinomial(weights, len(labels), replacement=True, generator=generator)
    out = labels.clone()
    n, size = len(labels), labels.shape[-1]
    for i in range(n):
        kind = names[int(kinds[i])]
        if kind == "swap" and n > 1:
            j = (i + 1 + int(torch.randint(n - 1, (1,), generator=generator))) % n
            out[i] = labels[j]
        elif kind == "shift":
            limit = max(1, round(max_shift * size))
            dy, dx = (int(v) for v in torch.randint(-limit, limit + 1, (2,), generator=generator))
            out[i] = _shifted(labels[i], dy, dx)
        elif kind in ("drop", "morph"):
            present = [c for c in range(1, num_classes) if bool((labels[i] == c).any())]
            if not present:
                continue
            c = present[int(torch.randint(len(present), (1,), generator=generator))]
            if kind == "drop":
                out[i][labels[i] == c] = 0
            else:
                radius = int(torch.randint(1, max_morph + 1, (1,), generator=generator))
                grow = bool(torch.rand(1, generator=generator) < 0.5)
                out[i] = _morphed(labels[i], c, radius, grow)
    return out


def _shifted(mask: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``mask`` moved by ``(dy, dx)`` pixels; what leaves the image is lost, what enters is 0."""
    out = torch.zeros_like(mask)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def _morphed(mask: torch.Tensor, c: int, radius: int, grow: bool) -> torch.Tensor:
    """``mask`` with class ``c`` dilated (``grow``) or eroded by a square of ``radius`` pixels;
    grown pixels overwrite others, eroded ones become background."""
    region = (mask == c).float()[None, None]
    k = 2 * radius + 1
    if grow:
        changed = F.max_pool2d(region, k, stride=1, padding=radius)[0, 0] > 0
        out = mask.clone()
        out[changed] = c
        return out
    kept = -F.max_pool2d(-region, k, stride=1, padding=radius)[0, 0] > 0
    out = mask.clone()
    out[(mask == c) & ~kept] = 0
    return out
