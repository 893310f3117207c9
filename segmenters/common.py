"""Building blocks shared by the BN1 and BN2 2D U-Nets: conv blocks, weight init, validation."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

__all__ = [
    "ConvBlock",
    "check_float_range",
    "check_int",
    "check_lr",
    "check_total_epochs",
    "count_parameters",
    "init_kaiming",
    "validate_input",
]


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) of at least ``minimum``; else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float_range(
    name: str, value: object, low: float, high: float, *, high_inclusive: bool = True
) -> float:
    """Return ``value`` as a float if it is finite and in ``[low, high]`` (or ``[low, high)``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    too_high = v > high if high_inclusive else v >= high
    if not math.isfinite(v) or v < low or too_high:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")
    return v


def check_lr(lr: object, default: float) -> float:
    """The learning rate to use: ``default`` when ``lr`` is None, else ``lr`` if finite and > 0."""
    if lr is None:
        return default
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not math.isfinite(float(lr)) or float(lr) <= 0.0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    return float(lr)


def check_total_epochs(total_epochs: object) -> int:
    """Return ``total_epochs`` if it is an int >= 1; else ValueError."""
    return check_int("total_epochs", total_epochs, 1)


class ConvBlock(nn.Sequential):
    """One 3x3 convolution with BatchNorm and LeakyReLU, in the order ``order`` names.

    ``order="conv-norm-act"`` is the nnU-Net block (BN1); ``"conv-act-norm"`` the ACDC-2017
    winner's block (BN2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        leaky_slope: float = 0.01,
        order: Literal["conv-norm-act", "conv-act-norm"] = "conv-norm-act",
    ) -> None:
        conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=True)
        norm = nn.BatchNorm2d(out_channels)
        act = nn.LeakyReLU(leaky_slope, inplace=True)
        if order == "conv-norm-act":
            super().__init__(conv, norm, act)
        elif order == "conv-act-norm":
            super().__init__(conv, act, norm)
        else:
            raise ValueError(f"order must be 'conv-norm-act' or 'conv-act-norm', got {order!r}")


def init_kaiming(module: nn.Module, leaky_slope: float) -> None:
    """He (Kaiming) normal init for every (transposed) conv under ``module``, for LeakyReLU.

    Biases are zeroed; BatchNorm layers start at weight 1, bias 0.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, a=leaky_slope, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _exporting() -> bool:
    """True while the model is being traced, scripted, compiled or exported."""
    return bool(
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


def validate_input(x: torch.Tensor, in_channels: int, divisor: int) -> None:
    """Raise ValueError unless ``x`` is ``(N, in_channels, H, W)`` with H, W multiples of ``divisor``.

    Skipped while tracing or exporting, so no shape-dependent branch enters an exported graph.
    """
    if _exporting():
        return
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"expected input of shape (N, {in_channels}, H, W), got {tuple(x.shape)}")
    h, w = int(x.shape[2]), int(x.shape[3])
    if h < divisor or w < divisor or h % divisor or w % divisor:
        raise ValueError(
            f"input height and width must be positive multiples of {divisor} (the network's "
            f"total stride), got {h}x{w}; pad or crop the slice first"
        )
