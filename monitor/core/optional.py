"""Optional dependencies: import them where they are used, with an error that names the extra.

The base install holds the core and the default method; MLflow, ONNX, the serve stack, Triton's
configuration protos and plotting are extras (``pip install 'qcloop[mlflow]'`` ...). A plugin or
command imports its optional library through :func:`require` at first use, never at module
level, so ``qcloop --help`` and the base install work without it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "require"]

#: Extra -> what it installs (as in pyproject.toml), for messages.
EXTRAS: dict[str, str] = {
    "mlflow": "MLflow tracking and the MLflow model registry",
    "onnx": "ONNX export and the onnxruntime runtime",
    "serve": "the HTTP service (FastAPI, python-multipart)",
    "triton": "Triton model repositories",
    "report": "figures (matplotlib)",
    "ray": "the Ray engine of assess and predict (Ray Data)",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, feature: str | None = None) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming ``extra``.

    Args:
        module: the module to import (``"mlflow"``, ``"onnxruntime"``...).
        extra: the qcloop extra that provides it.
        feature: what needs it, for the message (default: the extra's description).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = feature or EXTRAS.get(extra, extra)
        raise MissingExtraError(
            f"{what} needs the {extra!r} extra ({module} is not installed): "
            f"pip install 'qcloop[{extra}]'"
        ) from exc
