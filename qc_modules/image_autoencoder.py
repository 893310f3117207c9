"""The image-aware QC module: a denoising autoencoder of image-mask pairs.

The paper's QC module sees the mask alone, so a plausible heart drawn on the wrong structure
reads as good. This module sees the case's prepared slice beside the mask: its input is the
image and the (predicted) mask as ``1 + C`` channels, its output the mask that the image shows,
and it is trained on ground truth to restore corrupted masks
(:mod:`~qcloop.qc_modules.mask_corruption`: swapped, shifted, dropped, grown or shrunk) to
their truth. A good segmentation comes back unchanged; a wrong one comes back as what the image
and the learnt shapes agree on, so the core's pDC/pHD against it fall. Same network as the
mask autoencoder with one more input channel: one forward pass per slice, the mask autoencoder's
cost (measured by ``qcloop bench qc-modules``).

A cheaper relative of Wang et al. (MICCAI 2020), who project the pair onto a learnt manifold by
a latent search at test time (tens of forward passes per case); here the projection is learnt
once, as denoising.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from qcloop.qc_modules.autoencoder import MaskAutoencoder, NetState, stage_widths
from qcloop.qc_modules.autoencoder_training import (
    CollapseError,
    Log,
    class_names,
    one_hot,
    reconstruction_loss,
)
from qcloop.qc_modules.mask_corruption import DEFAULT_MIX, corrupt_masks

__all__ = ["ImageMaskQC"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "qcloop.image-autoencoder/1"
#: Validation slices scored per epoch (a fixed subset, so epochs compare).
MONITOR_SLICES = 256


class ImageMaskQC(NetState):
    """QC module that reconstructs a mask from the mask and its image (``needs_image``).

    Args:
        input_size, num_classes, latent_channels, width_scale, dropout, lr, weight_decay,
            epochs, batch_size, device: as for the mask autoencoder.
        input: ``"softmax"`` (probabilities as they are) or ``"onehot"`` (their argmax) at
            reconstruction; training sees one-hot corrupted masks.
        corruption: probability of each corruption (``clean``, ``swap``, ``shift``, ``drop``,
            ``morph``) in training.
        max_shift: largest training shift, as a fraction of the side.
        collapse_dice: a class whose clean-input validation Dice ends below this fails the fit.
    """

    #: the core passes the prepared slices to ``fit`` and ``reconstruct``
    needs_image = True
    STATE_FORMAT = STATE_FORMAT
    KIND = "an image-aware QC"

    def __init__(
        self,
        input_size: int = 128,
        num_classes: int = 4,
        latent_channels: int = 100,
        width_scale: float = 1.0,
        input: str = "softmax",
        dropout: float = 0.2,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        epochs: int = 40,
        batch_size: int = 16,
        device: str = "cpu",
        corruption: dict[str, float] | None = None,
        max_shift: float = 0.15,
        collapse_dice: float = 0.1,
    ) -> None:
        if input not in ("softmax", "onehot"):
            raise ValueError(f"input must be 'softmax' or 'onehot', got {input!r}")
        if epochs < 1 or batch_size < 2:
            raise ValueError("epochs >= 1 and batch_size >= 2 are required")
        mix = dict(DEFAULT_MIX if corruption is None else corruption)
        if any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"corruption probabilities must be >= 0 and not all 0: {mix}")
        self.input_size = int(input_size)
        self.num_classes = int(num_classes)
        self.latent_channels = int(latent_channels)
        self.width_scale = float(width_scale)
        self.widths = stage_widths(self.input_size, self.width_scale)
        self.input = input
        self.dropout = float(dropout)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.device = device
        self.corruption = mix
        self.max_shift = float(max_shift)
        self.collapse_dice = float(collapse_dice)
        self.fitted = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = self._build_net()
        self.net.eval()

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this module."""
        return {
            "input_size": self.input_size, "num_classes": self.num_classes,
            "latent_channels": self.latent_channels, "width_scale": self.width_scale,
            "input": self.input, "dropout": self.dropout, "lr": self.lr,
            "weight_decay": self.weight_decay, "epochs": self.epochs,
            "batch_size": self.batch_size, "device": self.device,
            "corruption": dict(self.corruption), "max_shift": self.max_shift,
            "collapse_dice": self.collapse_dice,
        }  # fmt: skip

    def _build_net(self) -> MaskAutoencoder:
        net = MaskAutoencoder(
            self.num_classes, self.widths, self.latent_channels, self.dropout, self.num_classes + 1
        )
        return net.to(self.device)

    # ------------------------------------------------------------------ training

    def fit(
        self,
        masks: np.ndarray,
        val_masks: np.ndarray | None = None,
        *,
        images: np.ndarray | None = None,
        val_images: np.ndarray | None = None,
        seed: int = 0,
        log: Log | None = None,
    ) -> dict[str, Any]:
        """Train on ground-truth masks ``(N, H, W)`` and their prepared slices ``images``.

        Returns the history: per epoch the loss and, on validation pairs (else a training
        subset), the Dice per class of the reconstruction of the clean mask (``dice``) and of a
        corrupted one (``dice_corrupted``, fixed corruptions). Raises ``ValueError`` for missing
        or mismatched images, :class:`CollapseError` when a class is lost at the end.
        """
        masks, images = self._check_pairs(masks, images, "masks", "images")
        if val_masks is not None:
            val_masks, val_images = self._check_pairs(
                val_masks, val_images, "val_masks", "val_images"
            )
        else:
            val_masks, val_images = masks, images
        pick = np.sort(np.random.default_rng(seed).permutation(len(val_masks))[:MONITOR_SLICES])
        monitor = self._monitor_set(val_masks[pick], val_images[pick], seed)
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = self._build_net()
            history = self._train(masks, images, monitor, seed, log)
        history["seconds"] = time.perf_counter() - started
        self.net.eval()
        final = history["epochs"][-1]
        lost = [k for k, v in final["dice"].items() if v < self.collapse_dice]
        if lost:
            raise CollapseError(
                f"image-aware QC module lost classes {lost} (clean validation Dice "
                f"{final['dice']}) after {self.epochs} epochs",
                history,
            )
        self.fitted = True
        history.update(dice=final["dice"], dice_corrupted=final["dice_corrupted"], seed=seed)
        return history

    def _monitor_set(
        self, masks: np.ndarray, images: np.ndarray, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, truth, fixed corruption of the truth) of the slices watched per epoch."""
        truth = torch.from_numpy(masks).long()
        gen = torch.Generator().manual_seed(seed + 1)
        bad = corrupt_masks(truth, gen, num_classes=self.num_classes, mix=self.corruption,
                            max_shift=self.max_shift)  # fmt: skip
        return torch.from_numpy(images), truth, bad

    def _train(
        self,
        masks: np.ndarray,
        images: np.ndarray,
        monitor: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        seed: int,
        log: Log | None,
    ) -> dict[str, Any]:
        """The epoch loop (Adam on the balanced reconstruction loss); the history."""
        from monai.losses import GeneralizedDiceLoss

        gd = GeneralizedDiceLoss(include_background=True, softmax=False, w_type="square")
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(seed)
        history: dict[str, Any] = {"epochs": [], "corruption": dict(self.corruption)}
        for epoch in range(1, self.epochs + 1):
            self.net.train()
            order = torch.randperm(len(masks), generator=gen).numpy()
            total = 0.0
            for start in range(0, len(masks), self.batch_size):
                idx = np.sort(order[start : start + self.batch_size])
                truth = torch.from_numpy(masks[idx]).long()
                bad = corrupt_masks(truth, gen, num_classes=self.num_classes,
                                    mix=self.corruption, max_shift=self.max_shift)  # fmt: skip
                x = self._input(torch.from_numpy(images[idx]), one_hot(bad, self.num_classes))
                target = one_hot(truth, self.num_classes).to(self.device)
                loss, _ = reconstruction_loss(self.net(x), target, gd, balanced=True)
                if not torch.isfinite(loss):
                    raise CollapseError(f"non-finite loss at epoch {epoch}", history)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx) / len(masks)
            entry = {"epoch": epoch, "loss": total, **self._agreement(monitor)}
            history["epochs"].append(entry)
            if log is not None:
                figures = {"qc/loss": total}
                figures.update({f"qc/dice_{k}": v for k, v in entry["dice"].items()})
                figures.update(
                    {f"qc/dice_corrupted_{k}": v for k, v in entry["dice_corrupted"].items()}
                )
                log(figures, epoch)
        return history

    @torch.no_grad()
    def _agreement(
        self, monitor: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> dict[str, dict[str, float]]:
        """Per-class Dice of the argmax reconstruction against the truth, from the clean and
        from the corrupted masks of the monitor set."""
        images, truth, bad = monitor
        out = {}
        for name, given in (("dice", truth), ("dice_corrupted", bad)):
            recon = self._reconstruct_batched(one_hot(given, self.num_classes), images).argmax(1)
            out[name] = _class_dice(recon, truth, self.num_classes)
        return out

    def _check_pairs(
        self, masks: np.ndarray, images: np.ndarray | None, m_name: str, i_name: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Masks as uint8 and images as finite float32, both ``(N, S, S)``, or ``ValueError``."""
        size = self.input_size
        masks = np.asarray(masks)
        if masks.ndim != 3 or masks.shape[1:] != (size, size) or len(masks) == 0:
            raise ValueError(f"{m_name} must be (N, {size}, {size}) label masks, got {masks.shape}")
        if not np.issubdtype(masks.dtype, np.integer) or masks.min() < 0:
            raise ValueError(f"{m_name} must hold labels in 0..{self.num_classes - 1}")
        if masks.max() >= self.num_classes:
            raise ValueError(f"{m_name} must hold labels in 0..{self.num_classes - 1}")
        if images is None:
            raise ValueError(f"the image-aware QC module needs {i_name} beside {m_name}")
        images = self._check_image(images, len(masks), i_name)
        return np.ascontiguousarray(masks, dtype=np.uint8), images

    def _check_image(self, image: np.ndarray, n: int, name: str = "image") -> np.ndarray:
        size = self.input_size
        image = np.asarray(image, dtype=np.float32)
        if image.shape != (n, size, size):
            raise ValueError(f"{name} must be ({n}, {size}, {size}) slices, got {image.shape}")
        if not np.isfinite(image).all():
            raise ValueError(f"{name} holds NaN or infinite intensities")
        return np.ascontiguousarray(image)

    # ------------------------------------------------------------------ inference

    def _input(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The network input ``(N, 1 + C, S, S)``: the image, then the mask channels."""
        device = next(self.net.parameters()).device
        return torch.cat([image[:, None].float(), masks.float()], 1).to(device)

    def _reconstruct_batched(self, masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        was_training = self.net.training
        self.net.eval()
        with torch.no_grad():
            if self.input == "onehot":
                masks = one_hot(masks.argmax(1), self.num_classes)
            out = [
                self.net(
                    self._input(images[i : i + self.batch_size], masks[i : i + self.batch_size])
                ).cpu()
                for i in range(0, len(masks), self.batch_size)
            ]
        self.net.train(was_training)
        if not out:
            return torch.zeros((0, self.num_classes, self.input_size, self.input_size))
        return torch.cat(out)

    def reconstruct(self, probabilities: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """The mask that ``image`` ``(N, S, S)`` and the learnt shapes agree on, from predicted
        probabilities ``(N, C, S, S)`` (or integer label masks ``(N, S, S)``); float32."""
        array = np.asarray(probabilities)
        if array.ndim == 3 and np.issubdtype(array.dtype, np.integer):
            tensor = one_hot(torch.from_numpy(array.astype(np.int64)), self.num_classes)
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        c, size = self.num_classes, self.input_size
        if tensor.ndim != 4 or tuple(tensor.shape[1:]) != (c, size, size):
            raise ValueError(f"expected (N, {c}, {size}, {size}) probabilities, got {array.shape}")
        if image is None:
            raise ValueError("the image-aware QC module reconstructs from the image: none given")
        pixels = torch.from_numpy(self._check_image(image, len(tensor)))
        return self._reconstruct_batched(tensor, pixels).numpy()


def _class_dice(recon: torch.Tensor, truth: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Dice per foreground class over a set of slices (1.0 where a class is absent from both)."""
    out = {}
    for k, name in class_names(num_classes).items():
        p, t = recon == k, truth == k
        denom = int(p.sum() + t.sum())
        out[name] = 2.0 * int((p & t).sum()) / denom if denom else 1.0
    return out
