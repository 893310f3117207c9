"""Built-in segmenter plugin: the BN1 (nnU-Net-style) and BN2 (ACDC-2017-style) 2D U-Nets."""

from __future__ import annotations

from typing import Any

from qcloop.monitor import hookimpl
from qcloop.monitor.core.hookspecs import Register


def _bn1(**params: Any) -> Any:
    from qcloop.segmenters.bn1 import BN1UNet

    return BN1UNet(**params)


def _bn2(**params: Any) -> Any:
    from qcloop.segmenters.bn2 import BN2UNet

    return BN2UNet(**params)


@hookimpl
def register_segmenters(register: Register) -> None:
    """Register ``bn1`` and ``bn2``."""
    register("bn1", _bn1)
    register("bn2", _bn2)
