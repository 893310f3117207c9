"""Training losses: generalised Dice + cross-entropy (supervised) and a structure-weighted
generalised Dice against a soft pseudo label (refinement).

The supervised generalised Dice is MONAI's ``GeneralizedDiceLoss`` (Sudre et al. 2017,
inverse-squared-volume class weights): the field-standard implementation. MONAI has no
per-structure emphasis on top of those weights, which the refinement loss needs (the paper's WGD
weights the RV more), so :func:`weighted_generalised_dice` is written here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(N, H, W)`` integer labels -> ``(N, C, H, W)`` float one-hot."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).to(torch.float32)


class SupervisedLoss(torch.nn.Module):
    """``L_sup = L_GD + L_CE`` on logits, with deep supervision over several outputs.

    Args:
        num_classes: number of classes including background.
        ds_weights: loss weight of each output (full resolution first); sums to 1.
    """

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        from monai.losses import GeneralizedDiceLoss

        self.num_classes = num_classes
        # batch=True: class volumes are summed over the batch before weighting, so a class that
        # is absent from one slice does not get an infinite weight on that slice.
        self.gd = GeneralizedDiceLoss(softmax=True, w_type="square", batch=True)

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of one logits map ``(N, C, h, w)`` against labels ``(N, H, W)``."""
        if target.shape[-2:] != logits.shape[-2:]:
            target = (
                F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0]
                .round()
                .long()
            )
        return self.gd(logits, one_hot(target, self.num_classes)) + F.cross_entropy(
            logits, target.long()
        )

    def forward(
        self,
        outputs: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor,
        ds_weights: Sequence[float] | None = None,
    ) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.single(outputs, target)
        weights = list(ds_weights) if ds_weights is not None else [1.0] + [0.0] * (len(outputs) - 1)
        if len(weights) != len(outputs):
            raise ValueError(f"{len(outputs)} outputs but {len(weights)} deep-supervision weights")
        total = outputs[0].new_zeros(())
        for w, out in zip(weights, outputs, strict=True):
            if w:
                total = total + w * self.single(out, target)
        return total


def weighted_generalised_dice(
    probabilities: torch.Tensor,
    target: torch.Tensor,
    class_weights: Sequence[float],
    eps: float = 1e-5,
) -> torch.Tensor:
    """Generalised Dice loss with inverse-squared-volume weights times ``class_weights``.

    Args:
        probabilities: ``(N, C, H, W)`` softmax output of the segmenter.
        target: ``(N, C, H, W)`` soft or one-hot pseudo label (no gradient needed).
        class_weights: extra per-class emphasis (e.g. background 0, RV 2), length ``C``.
    """
    if probabilities.shape != target.shape:
        raise ValueError(f"shape mismatch {tuple(probabilities.shape)} vs {tuple(target.shape)}")
    cw = probabilities.new_tensor(class_weights)
    if cw.numel() != probabilities.shape[1]:
        raise ValueError(f"{cw.numel()} class weights for {probabilities.shape[1]} classes")
    dims = (0, 2, 3)
    volume = target.sum(dims)
    w = cw / (volume * volume).clamp_min(eps)
    # classes absent from the pseudo label would get a huge weight: give them the largest weight
    # among the present classes instead (as MONAI does for its unweighted loss)
    present = volume > eps
    if present.any():
        w = torch.where(present, w, (w * present).max())
    intersection = (probabilities * target).sum(dims)
    denominator = (probabilities + target).sum(dims)
    numerator = 2.0 * (w * intersection).sum() + eps
    return 1.0 - numerator / ((w * denominator).sum() + eps)
