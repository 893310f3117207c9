"""Built-in plugin: the ``torch`` and ``torchscript`` model kinds of model cards.

* ``torch``: ``module`` names an ``nn.Module`` class (``monai.networks.nets.UNet``), built with
  ``params`` and loaded from the state dict at ``path`` (``torch.load(weights_only=True)``);
  trainable, so ``qcloop`` can fine-tune and refine it.
* ``torchscript``: ``path`` is a TorchScript archive (``torch.jit.save``); inference only.

Both run in eval mode under ``torch.inference_mode()``, on the device holding the module's
parameters (the CPU as loaded; move :attr:`TorchCardModel.module` to change it).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from qcloop.monitor import hookimpl
from qcloop.monitor.core.hookspecs import Register
from qcloop.monitor.core.model_card import ModelCard

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["TorchCardModel", "load_torch", "load_torchscript"]


class TorchCardModel:
    """An ``ExternalModel`` over a PyTorch module (eager or TorchScript)."""

    def __init__(self, kind: str, module: torch.nn.Module, *, trainable: bool) -> None:
        self.kind = kind
        self.trainable = trainable
        self._module = module.eval()

    @property
    def module(self) -> torch.nn.Module | None:
        """The eager module of a trainable kind; ``None`` for TorchScript."""
        return self._module if self.trainable else None

    def _device(self) -> torch.device:
        import torch

        for tensor in self._module.parameters():
            return tensor.device
        return torch.device("cpu")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """The module's raw output for float32 slices ``(N, 1, H, W)``, as a numpy array; a
        list or tuple output (deep supervision) gives its first (full-resolution) element."""
        import torch

        device = self._device()
        with torch.inference_mode():
            self._module.eval()
            out = self._module(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
            if isinstance(out, list | tuple):
                out = out[0]
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"the module returned {type(out).__name__}, not a tensor")
            return out.detach().cpu().numpy()

    def providers(self) -> list[str]:
        """The device the module runs on (``"cpu"``, ``"cuda:0"``)."""
        device = self._device()
        return [f"{device.type}:{device.index}" if device.index is not None else device.type]


def _import_class(card: ModelCard) -> type:
    """The class ``card.module`` names (``package.module.Class``)."""
    name = card.module or ""
    module_name, _, attr = name.rpartition(".")
    if not module_name:
        raise card.error("module", f"{name!r} is not an import path (package.module.Class)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise card.error("module", f"cannot import {module_name!r} ({exc})") from exc
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise card.error("module", f"{module_name!r} has no class {attr!r}")
    return cls


def _state_dict(card: ModelCard) -> Mapping[str, Any]:
    """The state dict stored at ``card.path`` (a bare one, or under a ``state_dict`` key)."""
    import torch

    path = card.resolved_path
    if not path.is_file():
        raise card.error("path", f"{path} is not a file (kind torch needs a weights file)")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise card.error("path", f"{path}: not a weights-only PyTorch file ({exc})") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise card.error("path", f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_torch(card: ModelCard) -> TorchCardModel:
    """The ``torch`` kind: ``module(**params)`` with the weights at ``path``, in eval mode."""
    cls = _import_class(card)
    import torch

    try:
        module = cls(**card.module_params)
    except Exception as exc:
        raise card.error("params", f"{card.module}(**params) failed ({exc})") from exc
    if not isinstance(module, torch.nn.Module):
        raise card.error("module", f"{card.module} is not a torch.nn.Module")
    state = _state_dict(card)
    try:
        module.load_state_dict(state)
    except Exception as exc:
        first = " ".join(str(exc).split())[:400]
        raise card.error(
            "path", f"the weights do not fit {card.module}(**params) ({first})"
        ) from exc
    return TorchCardModel("torch", module, trainable=True)


def load_torchscript(card: ModelCard) -> TorchCardModel:
    """The ``torchscript`` kind: the archive at ``path`` (``torch.jit.load``), in eval mode."""
    import torch

    path = card.resolved_path
    if not path.is_file():
        raise card.error("path", f"{path} is not a file (kind torchscript needs an archive)")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        first = " ".join(str(exc).split())[:400]
        raise card.error("path", f"{path}: not a TorchScript archive ({first})") from exc
    return TorchCardModel("torchscript", module, trainable=False)


@hookimpl
def register_model_kinds(register: Register) -> None:
    """Register the ``torch`` and ``torchscript`` model kinds."""
    register("torch", load_torch)
    register("torchscript", load_torchscript)
