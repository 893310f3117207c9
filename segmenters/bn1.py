"""BN1: the 2D nnU-Net-style U-Net of the M&Ms-1 winner (strided convs, transposed convs, BN)."""

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

__all__ = ["BN1UNet"]

logger = logging.getLogger(__name__)


class BN1UNet(nn.Module):
    """nnU-Net-style 2D U-Net: 1 channel in, ``num_classes`` logits out.

    Encoder: ``depth`` resolution levels of two Conv3x3-BatchNorm-LeakyReLU blocks; the first
    conv of every level but the first has stride 2. Widths are ``base_width * 2**i`` capped at
    ``max_width`` (reference: 32-64-128-256-480-480 for a 256 px input). Decoder: a 2x2
    transposed conv (stride 2) per level, concatenation with the skip, two conv blocks.

    Deep supervision: 1x1 heads at every decoder level except the lowest-resolution one (whose
    nnU-Net loss weight is 0). In training mode with ``deep_supervision=True`` ``forward``
    returns the list of head logits, full resolution first; output ``i`` has size
    ``(H / 2**i, W / 2**i)`` (its decoder level's resolution, see
    :meth:`deep_supervision_strides`) and the loss compares it with the target downsampled by
    nearest interpolation to that size, weighted by :meth:`deep_supervision_weights`. In eval
    mode, or with ``deep_supervision=False``, ``forward`` returns one ``(N, C, H, W)`` tensor.
    The heads exist whatever ``deep_supervision`` says, so state dicts load either way.

    Args:
        in_channels: image channels (1 for cine MRI).
        num_classes: output classes including background (4: background, LV, MYO, RV).
        base_width: channels of the full-resolution level.
        max_width: cap on the channels of any level.
        depth: number of resolution levels (``depth - 1`` stride-2 steps); 6 for 256 px.
        deep_supervision: return all head outputs in training mode.
        leaky_slope: negative slope of the LeakyReLU (also used by the Kaiming init).
    """

    #: The reference recipe (nnU-Net): SGD, Nesterov momentum, poly learning-rate decay.
    BASE_LR: float = 0.01
    MOMENTUM: float = 0.99
    WEIGHT_DECAY: float = 3e-5
    POLY_POWER: float = 0.9

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        base_width: int = 32,
        max_width: int = 480,
        depth: int = 6,
        deep_supervision: bool = True,
        leaky_slope: float = 0.01,
    ) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, 1)
        self.num_classes = check_int("num_classes", num_classes, 2)
        base_width = check_int("base_width", base_width, 1)
        max_width = check_int("max_width", max_width, 1)
        if max_width < base_width:
            raise ValueError(f"max_width ({max_width}) must be >= base_width ({base_width})")
        self.depth = check_int("depth", depth, 2)
        if not isinstance(deep_supervision, bool):
            raise ValueError(f"deep_supervision must be a bool, got {deep_supervision!r}")
        self.deep_supervision = deep_supervision
        self.leaky_slope = check_float_range("leaky_slope", leaky_slope, 0.0, 1.0)
        self.base_width = base_width
        self.max_width = max_width
        self.widths: list[int] = [min(base_width * 2**i, max_width) for i in range(depth)]
        self.divisor: int = 2 ** (depth - 1)

        block_kw: dict[str, Any] = {"leaky_slope": self.leaky_slope, "order": "conv-norm-act"}
        self.encoder = nn.ModuleList()
        prev = self.in_channels
        for i, w in enumerate(self.widths):
            self.encoder.append(
                nn.Sequential(
                    ConvBlock(prev, w, stride=1 if i == 0 else 2, **block_kw),
                    ConvBlock(w, w, **block_kw),
                )
            )
            prev = w
        # Decoder modules are indexed by level j (0 = full resolution), j = 0 .. depth - 2.
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(self.widths[j + 1], self.widths[j], 2, stride=2, bias=False)
            for j in range(depth - 1)
        )
        self.decoder = nn.ModuleList(
            nn.Sequential(
                ConvBlock(2 * self.widths[j], self.widths[j], **block_kw),
                ConvBlock(self.widths[j], self.widths[j], **block_kw),
            )
            for j in range(depth - 1)
        )
        # Heads at decoder levels 0 .. depth - 3 (all but the lowest; at least the final one).
        n_heads = max(1, depth - 2)
        self.heads = nn.ModuleList(
            nn.Conv2d(self.widths[j], self.num_classes, 1, bias=False) for j in range(n_heads)
        )
        init_kaiming(self, self.leaky_slope)
        logger.debug("built %s", self.describe())

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits ``(N, C, H, W)``; in training with deep supervision, one per head (see class)."""
        validate_input(x, self.in_channels, self.divisor)
        skips: list[torch.Tensor] = []
        h = x
        for stage in self.encoder:
            h = stage(h)
            skips.append(h)
        all_heads = self.training and self.deep_supervision
        outputs: list[torch.Tensor] = []
        for j in range(self.depth - 2, -1, -1):
            h = self.upsample[j](h)
            h = torch.cat([h, skips[j]], dim=1)
            h = self.decoder[j](h)
            if j == 0 or (all_heads and j < len(self.heads)):
                outputs.append(self.heads[j](h))
        if not all_heads:
            return outputs[-1]
        outputs.reverse()
        return outputs

    def deep_supervision_strides(self) -> list[int]:
        """Downsampling factor of each output returned in training mode (full resolution = 1)."""
        if not self.deep_supervision:
            return [1]
        return [2**i for i in range(len(self.heads))]

    def deep_supervision_weights(self) -> list[float]:
        """Loss weight of each training-mode output: ``1 / 2**i`` normalised to sum 1."""
        raw = [1.0 / s for s in self.deep_supervision_strides()]
        total = sum(raw)
        return [r / total for r in raw]

    def make_optimizer(
        self, total_epochs: int, lr: float | None = None
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """SGD (Nesterov, momentum 0.99, weight decay 3e-5) and the poly schedule.

        The scheduler is stepped once per epoch; at epoch ``e`` the learning rate is
        ``lr * (1 - e / total_epochs) ** 0.9`` (0 from ``total_epochs`` on). ``lr`` defaults
        to 0.01.
        """
        total = check_total_epochs(total_epochs)
        base_lr = check_lr(lr, self.BASE_LR)
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=base_lr,
            momentum=self.MOMENTUM,
            nesterov=True,
            weight_decay=self.WEIGHT_DECAY,
        )
        scheduler = torch.optim.lr_scheduler.PolynomialLR(
            optimizer, total_iters=total, power=self.POLY_POWER
        )
        return optimizer, scheduler

    def describe(self) -> dict[str, Any]:
        """Architecture name, widths, depth, parameter count and options, for logs/metadata."""
        return {
            "architecture": "BN1UNet",
            "style": "nnU-Net 2D (M&Ms-1 winner)",
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "base_width": self.base_width,
            "max_width": self.max_width,
            "widths": list(self.widths),
            "depth": self.depth,
            "divisor": self.divisor,
            "deep_supervision": self.deep_supervision,
            "deep_supervision_strides": self.deep_supervision_strides(),
            "deep_supervision_weights": self.deep_supervision_weights(),
            "leaky_slope": self.leaky_slope,
            "parameters": count_parameters(self),
        }
