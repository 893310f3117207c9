"""BN2: the 2D U-Net of the ACDC-2017 winner (max-pooling, nearest upsampling, summed heads)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from qcloop.segmenters.common import (
    ConvBlock,
    check_float_range,
    check_int,
    check_lr,
    check_total_epochs,
    count_parameters,
    init_kaiming,
    validate_input,
)

__all__ = ["BN2UNet"]

logger = logging.getLogger(__name__)

#: Decoder levels whose 1x1 logits are summed into the final logits (1/2 and 1/4 resolution).
_SUMMED_LEVELS: tuple[int, ...] = (1, 2)
#: Dropout acts on the outputs of this many deepest encoder levels (the bottleneck and the one
#: above it).
_DROPOUT_LEVELS: int = 2


class BN2UNet(nn.Module):
    """ACDC-2017-winner-style 2D U-Net: 1 channel in, ``num_classes`` logits out.

    Encoder: ``depth`` levels (``depth - 1`` 2x2 max-pool steps), two 3x3 Conv-LeakyReLU-
    BatchNorm blocks each (that order), widths ``base_width * 2**i`` (reference 48-96-192-384-
    768). Dropout ``dropout`` acts on the outputs of the two deepest levels (the bottleneck and
    the level above, which is also a skip). Decoder: nearest 2x upsampling, concatenation with
    the skip, two conv blocks.

    Deep supervision is summed, as the ACDC winner did: with ``deep_supervision=True`` the 1x1
    logits of the 1/4- and 1/2-resolution decoder levels are upsampled (nearest) and added into
    the final logits (``up(up(s_4) + s_2) + s_1``), in training and in eval alike. The loss
    therefore sees a single output: in training mode ``forward`` returns a one-element list
    ``[logits]`` with weight ``[1.0]``; in eval mode, or with ``deep_supervision=False``, one
    ``(N, C, H, W)`` tensor.

    Args:
        in_channels: image channels (1 for cine MRI).
        num_classes: output classes including background (4: background, LV, MYO, RV).
        base_width: channels of the full-resolution level.
        depth: number of resolution levels (5 for the reference network).
        dropout: dropout probability in the two deepest levels (0 disables it).
        deep_supervision: sum the lower-resolution heads into the final logits.
        leaky_slope: negative slope of the LeakyReLU (also used by the Kaiming init).
    """

    #: The reference recipe: Adam 5e-4, learning rate x0.985 per epoch.
    BASE_LR: float = 5e-4
    LR_DECAY: float = 0.985

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        base_width: int = 48,
        depth: int = 5,
        dropout: float = 0.3,
        deep_supervision: bool = True,
        leaky_slope: float = 0.01,
    ) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, 1)
        self.num_classes = check_int("num_classes", num_classes, 2)
        self.base_width = check_int("base_width", base_width, 1)
        self.depth = check_int("depth", depth, 2)
        self.dropout = check_float_range("dropout", dropout, 0.0, 1.0, high_inclusive=False)
        if not isinstance(deep_supervision, bool):
            raise ValueError(f"deep_supervision must be a bool, got {deep_supervision!r}")
        self.deep_supervision = deep_supervision
        self.leaky_slope = check_float_range("leaky_slope", leaky_slope, 0.0, 1.0)
        self.widths: list[int] = [self.base_width * 2**i for i in range(depth)]
        self.divisor: int = 2 ** (depth - 1)

        block_kw: dict[str, Any] = {"leaky_slope": self.leaky_slope, "order": "conv-act-norm"}
        self.encoder = nn.ModuleList()
        prev = self.in_channels
        for i, w in enumerate(self.widths):
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [ConvBlock(prev, w, **block_kw), ConvBlock(w, w, **block_kw)]
            if i >= depth - _DROPOUT_LEVELS and self.dropout > 0.0:
                layers.append(nn.Dropout(self.dropout))
            self.encoder.append(nn.Sequential(*layers))
            prev = w
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        # Decoder blocks are indexed by level j (0 = full resolution), j = 0 .. depth - 2.
        self.decoder = nn.ModuleList(
            nn.Sequential(
                ConvBlock(self.widths[j + 1] + self.widths[j], self.widths[j], **block_kw),
                ConvBlock(self.widths[j], self.widths[j], **block_kw),
            )
            for j in range(depth - 1)
        )
        self.head = nn.Conv2d(self.widths[0], self.num_classes, 1)
        self.summed_levels: list[int] = (
            [j for j in _SUMMED_LEVELS if j <= depth - 2] if deep_supervision else []
        )
        self.summed_heads = nn.ModuleDict(
            {str(j): nn.Conv2d(self.widths[j], self.num_classes, 1) for j in self.summed_levels}
        )
        init_kaiming(self, self.leaky_slope)
        logger.debug("built %s", self.describe())

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits ``(N, C, H, W)``; a one-element list in training with deep supervision."""
        validate_input(x, self.in_channels, self.divisor)
        skips: list[torch.Tensor] = []
        h = x
        for stage in self.encoder:
            h = stage(h)
            skips.append(h)
        summed: torch.Tensor | None = None
        for j in range(self.depth - 2, -1, -1):
            h = self.upsample(h)
            h = torch.cat([h, skips[j]], dim=1)
            h = self.decoder[j](h)
            if summed is not None:
                summed = self.upsample(summed)
            key = str(j)
            if j > 0 and key in self.summed_heads:
                s = self.summed_heads[key](h)
                summed = s if summed is None else summed + s
        logits = self.head(h)
        if summed is not None:
            logits = logits + summed
        if self.training and self.deep_supervision:
            return [logits]
        return logits

    def deep_supervision_strides(self) -> list[int]:
        """Downsampling factor of each output returned in training mode: ``[1]`` (summed heads)."""
        return [1]

    def deep_supervision_weights(self) -> list[float]:
        """Loss weight of each training-mode output: ``[1.0]`` (the heads are summed in)."""
        return [1.0]

    def make_optimizer(
        self, total_epochs: int, lr: float | None = None
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Adam and an exponential schedule: ``lr * 0.985 ** e`` at epoch ``e``.

        The scheduler is stepped once per epoch; ``lr`` defaults to 5e-4. ``total_epochs`` is
        validated but does not change the schedule.
        """
        check_total_epochs(total_epochs)
        base_lr = check_lr(lr, self.BASE_LR)
        optimizer = torch.optim.Adam(self.parameters(), lr=base_lr)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.LR_DECAY)
        return optimizer, scheduler

    def describe(self) -> dict[str, Any]:
        """Architecture name, widths, depth, parameter count and options, for logs/metadata."""
        return {
            "architecture": "BN2UNet",
            "style": "ACDC-2017 winner 2D U-Net",
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "base_width": self.base_width,
            "widths": list(self.widths),
            "depth": self.depth,
            "divisor": self.divisor,
            "dropout": self.dropout,
            "deep_supervision": self.deep_supervision,
            "summed_levels": list(self.summed_levels),
            "leaky_slope": self.leaky_slope,
            "parameters": count_parameters(self),
        }
