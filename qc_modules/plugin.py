"""Built-in QC-module plugin: the convolutional mask autoencoder."""

from __future__ import annotations

from typing import Any

from qcloop.monitor import hookimpl
from qcloop.monitor.core.hookspecs import Register


def _autoencoder(**params: Any) -> Any:
    from qcloop.qc_modules.autoencoder import AutoencoderQC

    return AutoencoderQC(**params)


@hookimpl
def register_qc_modules(register: Register) -> None:
    """Register ``autoencoder``."""
    register("autoencoder", _autoencoder)
