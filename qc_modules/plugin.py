"""Built-in QC-module plugins: the paper's convolutional mask autoencoder, and the image-aware
autoencoder of image-mask pairs."""

from __future__ import annotations

from typing import Any

from qcloop.monitor import hookimpl
from qcloop.monitor.core.hookspecs import Register


def _autoencoder(**params: Any) -> Any:
    from qcloop.qc_modules.autoencoder import AutoencoderQC

    return AutoencoderQC(**params)


def _image_autoencoder(**params: Any) -> Any:
    from qcloop.qc_modules.image_autoencoder import ImageMaskQC

    return ImageMaskQC(**params)


@hookimpl
def register_qc_modules(register: Register) -> None:
    """Register ``autoencoder`` and ``image_autoencoder``."""
    register("autoencoder", _autoencoder)
    register("image_autoencoder", _image_autoencoder)
