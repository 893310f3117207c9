"""The QC module R: a convolutional autoencoder of 4-class masks (Galati & Zuluaga 2021).

``MaskAutoencoder`` is the network (softmax probabilities out, ONNX-friendly); ``AutoencoderQC``
is the ``QCModule`` component that trains it on ground-truth masks and reconstructs predictions.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qcloop.qc_modules.autoencoder_training import (
    CollapseError,
    Log,
    TrainingConfig,
    one_hot,
    train_autoencoder,
)

__all__ = ["AutoencoderQC", "CollapseError", "MaskAutoencoder", "NetState", "stage_widths"]

logger = logging.getLogger(__name__)

#: Encoder widths of the reference 256 px network, before the latent stage.
REFERENCE_WIDTHS: tuple[int, ...] = (32, 32, 32, 64, 128)
#: Spatial size of the latent map.
LATENT_SIZE = 4
#: Format tag of ``AutoencoderQC.state_dict``.
STATE_FORMAT = "qcloop.autoencoder/1"
INPUT_MODES = ("softmax", "onehot")


def num_stages(input_size: int) -> int:
    """Stride-2 stages that bring ``input_size`` down to the 4x4 latent: log2(input_size / 4)."""
    stages = math.log2(input_size / LATENT_SIZE) if input_size > 0 else -1.0
    if stages < 2 or stages != int(stages):
        raise ValueError(
            f"input_size must be 4 * 2**k with k >= 2 (16, 32, 64, ...), got {input_size}"
        )
    return int(stages)


def stage_widths(input_size: int, width_scale: float = 1.0) -> tuple[int, ...]:
    """Encoder widths for ``input_size``: the reference widths' last ``num_stages - 1`` entries
    (padded with the first width for inputs above 256 px), scaled by ``width_scale``."""
    if width_scale <= 0:
        raise ValueError(f"width_scale must be positive, got {width_scale}")
    n = num_stages(input_size) - 1
    pad = max(0, n - len(REFERENCE_WIDTHS))
    base = (REFERENCE_WIDTHS[0],) * pad + REFERENCE_WIDTHS[len(REFERENCE_WIDTHS) - n + pad :]
    return tuple(max(1, round(w * width_scale)) for w in base)


def _block(layer: nn.Module, channels: int, dropout: float) -> list[nn.Module]:
    """Conv-BatchNorm-LeakyReLU(0.2)-Dropout."""
    block = [layer, nn.BatchNorm2d(channels), nn.LeakyReLU(0.2)]
    if dropout > 0:
        block.append(nn.Dropout(dropout))
    return block


class MaskAutoencoder(nn.Module):
    """Convolutional autoencoder of ``num_classes``-channel masks; outputs softmax probabilities.
    ``in_channels`` (default ``num_classes``) widens the input for extra channels beside the mask
    (the image-aware QC module feeds the image as one more channel).

    Encoder: per width, a stride-2 4x4 conv then a 3x3 conv, then a stride-2 4x4 conv to the
    ``latent_channels`` x 4 x 4 latent. Decoder: the mirror with stride-2 4x4 transposed convs,
    ending in a transposed conv to ``num_classes`` and a softmax over classes.
    """

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int],
        latent_channels: int,
        dropout: float,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        encoder: list[nn.Module] = []
        c_in = num_classes if in_channels is None else int(in_channels)
        for w in widths:
            encoder += _block(nn.Conv2d(c_in, w, 4, stride=2, padding=1, bias=False), w, dropout)
            encoder += _block(nn.Conv2d(w, w, 3, padding=1, bias=False), w, dropout)
            c_in = w
        encoder += _block(
            nn.Conv2d(c_in, latent_channels, 4, stride=2, padding=1, bias=False),
            latent_channels,
            dropout,
        )
        decoder: list[nn.Module] = []
        c_in = latent_channels
        for w in reversed(widths):
            decoder += _block(
                nn.ConvTranspose2d(c_in, w, 4, stride=2, padding=1, bias=False), w, dropout
            )
            decoder += _block(nn.Conv2d(w, w, 3, padding=1, bias=False), w, dropout)
            c_in = w
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)
        self.head = nn.ConvTranspose2d(c_in, num_classes, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, C, H, W)`` reconstructed from masks ``(N, C, H, W)``."""
        return torch.softmax(self.head(self.decoder(self.encoder(x))), dim=1)


class NetState:
    """``state_dict`` / ``load_state_dict`` of a QC module that holds one network ``net`` and is
    rebuilt by its constructor from :meth:`hparams`; ``STATE_FORMAT`` tags its states and
    ``KIND`` names it in errors."""

    STATE_FORMAT: str
    KIND: str
    net: nn.Module
    fitted: bool
    device: str

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this module."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters and weights (CPU tensors), loadable with ``torch.load(weights_only=True)``."""
        return {
            "format": self.STATE_FORMAT,
            "hparams": self.hparams(),
            "fitted": self.fitted,
            "net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt the hyper-parameters and weights of ``state`` (rebuilding the network); the
        device stays this instance's."""
        if state.get("format") != self.STATE_FORMAT:
            raise ValueError(f"not {self.KIND} state (format {state.get('format')!r})")
        fresh = type(self)(**{**state["hparams"], "device": self.device})
        fresh.net.load_state_dict(state["net"])
        self.__dict__.update(fresh.__dict__)
        self.fitted = bool(state.get("fitted", True))
        self.net.eval()


class AutoencoderQC(NetState):
    """QC module R: trains a :class:`MaskAutoencoder` on ground-truth masks and reconstructs
    predicted masks, so that the core can score prediction against reconstruction.

    Args:
        input_size: side of the square masks in pixels, 4 * 2**k (latent is always 4x4).
        num_classes: classes including background (qcloop: 0 bg, 1 LV, 2 MYO, 3 RV).
        latent_channels: channels of the 4x4 latent map.
        widths: encoder widths before the latent stage, ``num_stages - 1`` of them; by default
            sized from ``input_size`` (256 px: 32, 32, 32, 64, 128) times ``width_scale``.
        width_scale: factor on the default widths (small values for CPU tests).
        input: ``"softmax"`` feeds predicted probabilities to R as they are (the authors' code);
            ``"onehot"`` feeds the one-hot of their argmax. Training always sees one-hot masks.
        dropout: dropout after every hidden layer.
        lr, weight_decay: Adam settings.
        epochs, batch_size: training schedule; ``batch_size`` also batches ``reconstruct``.
        device: torch device of training and reconstruction.
        balanced_loss: start with the balanced loss (otherwise it is switched on at collapse).
        collapse_warmup: first epoch at which collapse is checked.
        collapse_patience: epochs a collapse may last before a restart.
        collapse_warmup_steps, collapse_patience_steps: floors of the two above in optimisation
            steps (they matter for small mask sets, where an epoch is one or two steps).
        collapse_dice: a class whose argmax reconstruction Dice falls below this is collapsed.
        collapse_fraction: so is a class whose predicted area falls below this fraction of its
            true area.
        max_restarts: restarts (new seed, balanced loss) before :class:`CollapseError`.
        augment_flip, augment_rotation_deg, augment_scale: random flips, in-plane rotation
            (maximum absolute angle, degrees) and scaling of the training masks. Off by default
            (the paper trains R on the masks as they are); with them R learns plausible hearts
            in poses the training scanner never produced, so a correct segmentation of a heart
            rotated by another scanner's planning is not scored as implausible.
    """

    STATE_FORMAT = STATE_FORMAT
    KIND = "an autoencoder"

    def __init__(
        self,
        input_size: int = 128,
        num_classes: int = 4,
        latent_channels: int = 100,
        widths: Sequence[int] | None = None,
        width_scale: float = 1.0,
        input: str = "softmax",
        dropout: float = 0.5,
        lr: float = 2e-4,
        weight_decay: float = 1e-5,
        epochs: int = 40,
        batch_size: int = 16,
        device: str = "cpu",
        balanced_loss: bool = False,
        collapse_warmup: int = 5,
        collapse_patience: int = 3,
        collapse_warmup_steps: int = 60,
        collapse_patience_steps: int = 30,
        collapse_dice: float = 0.1,
        collapse_fraction: float = 0.1,
        max_restarts: int = 2,
        augment_flip: bool = False,
        augment_rotation_deg: float = 0.0,
        augment_scale: Sequence[float] = (1.0, 1.0),
    ) -> None:
        if input not in INPUT_MODES:
            raise ValueError(f"input must be one of {INPUT_MODES}, got {input!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if epochs < 1 or batch_size < 2 or max_restarts < 0:
            raise ValueError("epochs >= 1, batch_size >= 2 and max_restarts >= 0 are required")
        if widths is None:
            widths = stage_widths(input_size, width_scale)
        elif len(widths) != num_stages(input_size) - 1:
            raise ValueError(
                f"{input_size} px needs {num_stages(input_size) - 1} widths, got {list(widths)}"
            )
        self.input_size = input_size
        self.num_classes = num_classes
        self.latent_channels = latent_channels
        self.widths = tuple(int(w) for w in widths)
        self.width_scale = width_scale
        self.input = input
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.device = device
        self.balanced_loss = balanced_loss
        self.collapse_warmup = collapse_warmup
        self.collapse_patience = collapse_patience
        self.collapse_warmup_steps = collapse_warmup_steps
        self.collapse_patience_steps = collapse_patience_steps
        self.collapse_dice = collapse_dice
        self.collapse_fraction = collapse_fraction
        self.max_restarts = max_restarts
        if not 0 <= augment_rotation_deg <= 180:
            raise ValueError(
                f"augment_rotation_deg must be in [0, 180], got {augment_rotation_deg}"
            )
        lo, hi = (float(v) for v in augment_scale)
        if not 0 < lo <= hi:
            raise ValueError(
                f"augment_scale must be (low, high) with 0 < low <= high, got {augment_scale}"
            )
        self.augment_flip = bool(augment_flip)
        self.augment_rotation_deg = float(augment_rotation_deg)
        self.augment_scale = (lo, hi)
        self.fitted = False
        with torch.random.fork_rng(devices=[]):  # a fixed initial state; caller's RNG untouched
            torch.manual_seed(0)
            self.net: MaskAutoencoder = self._build_net()
        self.net.eval()

    # ------------------------------------------------------------------ construction

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this module."""
        return {
            "input_size": self.input_size,
            "num_classes": self.num_classes,
            "latent_channels": self.latent_channels,
            "widths": list(self.widths),
            "width_scale": self.width_scale,
            "input": self.input,
            "dropout": self.dropout,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "device": self.device,
            "balanced_loss": self.balanced_loss,
            "collapse_warmup": self.collapse_warmup,
            "collapse_patience": self.collapse_patience,
            "collapse_warmup_steps": self.collapse_warmup_steps,
            "collapse_patience_steps": self.collapse_patience_steps,
            "collapse_dice": self.collapse_dice,
            "collapse_fraction": self.collapse_fraction,
            "max_restarts": self.max_restarts,
            "augment_flip": self.augment_flip,
            "augment_rotation_deg": self.augment_rotation_deg,
            "augment_scale": list(self.augment_scale),
        }

    def _build_net(self) -> MaskAutoencoder:
        net = MaskAutoencoder(self.num_classes, self.widths, self.latent_channels, self.dropout)
        return net.to(self.device)

    def _training_config(self) -> TrainingConfig:
        return TrainingConfig(
            num_classes=self.num_classes,
            lr=self.lr,
            weight_decay=self.weight_decay,
            epochs=self.epochs,
            batch_size=self.batch_size,
            device=self.device,
            balanced_loss=self.balanced_loss,
            collapse_warmup=self.collapse_warmup,
            collapse_patience=self.collapse_patience,
            collapse_warmup_steps=self.collapse_warmup_steps,
            collapse_patience_steps=self.collapse_patience_steps,
            collapse_dice=self.collapse_dice,
            collapse_fraction=self.collapse_fraction,
            max_restarts=self.max_restarts,
            augment_flip=self.augment_flip,
            augment_rotation_deg=self.augment_rotation_deg,
            augment_scale=self.augment_scale,
        )

    # ------------------------------------------------------------------ training

    def fit(
        self,
        masks: np.ndarray,
        val_masks: np.ndarray | None = None,
        *,
        seed: int = 0,
        log: Log | None = None,
        start_collapsed: bool = False,
    ) -> dict[str, Any]:
        """Train on ground-truth label masks ``(N, H, W)`` (values ``0..num_classes-1``).

        Returns the history: ``epochs`` (per epoch: attempt, losses, per-class reconstruction
        ``dice`` and predicted/true area ``fraction_ratio`` on ``monitor`` - the validation masks
        when given, else a fixed training subset), ``collapse_events`` (what was detected and
        done), ``loss`` (per-epoch loss of the kept attempt), ``dice``, ``attempts``, ``seed``,
        ``balanced_loss`` and ``seconds``. ``log(metrics, step)`` receives each epoch's figures.
        ``start_collapsed`` deliberately starts the first attempt collapsed (for tests).
        Raises :class:`CollapseError` when the network is still collapsed after every restart.
        """
        masks = self._check_masks(masks, "masks")
        if val_masks is not None:
            val_masks = self._check_masks(val_masks, "val_masks")
        net, history = train_autoencoder(
            self._build_net,
            masks,
            val_masks,
            self._training_config(),
            seed=seed,
            log=log,
            start_collapsed=start_collapsed,
        )
        self.net = net
        self.net.eval()
        self.fitted = True
        return history

    def _check_masks(self, masks: np.ndarray, name: str) -> np.ndarray:
        masks = np.asarray(masks)
        size = self.input_size
        if masks.ndim != 3 or masks.shape[1:] != (size, size) or len(masks) == 0:
            raise ValueError(f"{name} must be (N, {size}, {size}) label masks, got {masks.shape}")
        if not np.issubdtype(masks.dtype, np.integer):
            raise ValueError(f"{name} must hold integer labels, got dtype {masks.dtype}")
        if masks.min() < 0 or masks.max() >= self.num_classes:
            raise ValueError(f"{name} labels must lie in 0..{self.num_classes - 1}")
        return np.ascontiguousarray(masks, dtype=np.uint8)

    # ------------------------------------------------------------------ inference

    def reconstruct(self, probabilities: np.ndarray) -> np.ndarray:
        """Reconstruct predictions: ``(N, C, H, W)`` probabilities (or ``(N, H, W)`` integer
        label masks) in, ``(N, C, H, W)`` float32 softmax probabilities out.

        With ``input="onehot"`` the probabilities are first replaced by the one-hot of their
        argmax. Runs batched, in eval mode, without gradients.
        """
        array = np.asarray(probabilities)
        if array.ndim == 3 and np.issubdtype(array.dtype, np.integer):
            labels = torch.from_numpy(self._check_masks(array, "masks")).long()
            tensor = one_hot(labels, self.num_classes)
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        out = [
            self.reconstruct_tensor(tensor[i : i + self.batch_size].to(self.device)).cpu()
            for i in range(0, len(tensor), self.batch_size)
        ]
        if not out:
            return np.zeros((0, self.num_classes, self.input_size, self.input_size), np.float32)
        return torch.cat(out).numpy()

    def reconstruct_tensor(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Reconstruct a ``(N, C, H, W)`` probability tensor; returns probabilities on the same
        device and dtype, detached.

        For use inside another model's training graph (the refiner's pseudo label yR = R(yM)):
        R runs in eval mode under ``torch.no_grad``, so no gradient reaches R's parameters nor
        flows back to ``probabilities``.
        """
        size, c = self.input_size, self.num_classes
        if probabilities.ndim != 4 or tuple(probabilities.shape[1:]) != (c, size, size):
            raise ValueError(
                f"expected (N, {c}, {size}, {size}) probabilities, got {tuple(probabilities.shape)}"
            )
        param = next(self.net.parameters())
        was_training = self.net.training
        self.net.eval()
        with torch.no_grad():
            x = probabilities.detach().to(device=param.device, dtype=param.dtype)
            if self.input == "onehot":
                x = one_hot(x.argmax(dim=1), c)
            out = self.net(x)
        self.net.train(was_training)
        return out.to(device=probabilities.device, dtype=probabilities.dtype)

    # ------------------------------------------------------------------ persistence

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str | None = None) -> AutoencoderQC:
        """A module rebuilt from ``state_dict()`` output, on ``device`` (default: the saved one)."""
        qc = cls(**{**state["hparams"], "device": device or state["hparams"]["device"]})
        qc.load_state_dict(state)
        return qc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``state_dict()`` to ``path`` atomically (temporary file, then ``os.replace``)."""
        target = Path(path)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(self.state_dict(), fh)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | None = None) -> AutoencoderQC:
        """A module loaded from a file written by :meth:`save`."""
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls.from_state_dict(state, device=device)
