"""Phantom appearance: bSSFP tissue contrast, vendor presets and the acquisition chain.

Chain, in order: tissue contrast -> gamma -> blur (PSF) -> bias field -> ghosting -> Rician
noise -> scanner intensity scaling. Every step changes intensities only, never labels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from qcloop.monitor.phantoms.scene import TISSUES

__all__ = [
    "TISSUE_INTENSITY",
    "TISSUE_TEXTURE",
    "VENDORS",
    "ImagingChain",
    "VendorPreset",
    "acquire",
    "bias_field",
    "bias_pattern",
    "sample_chain",
]

#: bSSFP intensity of each tissue relative to LV blood (before per-subject jitter).
TISSUE_INTENSITY: dict[str, float] = {
    "air": 0.0,
    "fat": 0.85,
    "muscle": 0.30,
    "soft": 0.34,
    "lung": 0.06,
    "liver": 0.40,
    "bone": 0.05,
    "marrow": 0.50,
    "csf": 0.90,
    "vessel": 0.97,
    "atrium": 0.92,
    "rv_wall": 0.28,  # follows the myocardium
    "rv_blood": 0.95,
    "myocardium": 0.28,
    "lv_blood": 1.0,
    "papillary": 0.28,  # follows the myocardium
}
#: Relative amplitude of the smooth texture inside each tissue.
TISSUE_TEXTURE: dict[str, float] = {
    "air": 0.0,
    "fat": 0.05,
    "muscle": 0.07,
    "soft": 0.09,
    "lung": 0.25,
    "liver": 0.07,
    "bone": 0.2,
    "marrow": 0.12,
    "csf": 0.03,
    "vessel": 0.03,
    "atrium": 0.04,
    "rv_wall": 0.05,
    "rv_blood": 0.03,
    "myocardium": 0.06,
    "lv_blood": 0.025,
    "papillary": 0.05,
}
_MYO_LIKE = ("rv_wall", "myocardium", "papillary")


@dataclass(frozen=True)
class VendorPreset:
    """Ranges of the acquisition knobs for one scanner vendor (DATA.md's table)."""

    code: str
    scanner: str
    field_t: float
    spacing_mm: tuple[float, float]
    rotation_deg: float  # in-plane rotation drawn in +-this
    myocardium: tuple[float, float]
    gamma: tuple[float, float]
    blur_sigma_px: tuple[float, float]
    bias_coefficient: tuple[float, float]
    rician_sigma: tuple[float, float]
    ghosting_probability: float
    intensity_scale: tuple[float, float]


#: A is the training vendor; B a moderate shift; C a strong one.
VENDORS: dict[str, VendorPreset] = {
    "A": VendorPreset(
        "A", "Phantom Aurora", 1.5, (1.3, 1.5), 15.0, (0.24, 0.32), (0.9, 1.1), (0.3, 0.6),
        (0.0, 0.15), (0.02, 0.04), 0.0, (800.0, 1200.0),
    ),
    "B": VendorPreset(
        "B", "Phantom Borealis", 3.0, (1.1, 1.25), 25.0, (0.36, 0.44), (0.6, 0.75), (0.8, 1.1),
        (0.3, 0.45), (0.05, 0.07), 0.0, (150.0, 300.0),
    ),
    "C": VendorPreset(
        "C", "Phantom Corona", 1.5, (1.7, 1.9), 40.0, (0.18, 0.24), (1.3, 1.6), (1.2, 1.6),
        (0.5, 0.7), (0.06, 0.09), 0.6, (2000.0, 4000.0),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class ImagingChain:
    """The intensity side of one subject's acquisition: contrast and degradations.

    ``seed`` fixes the random parts (bias pattern, ghosts, noise) so that changing one knob keeps
    every other draw.
    """

    intensity: tuple[float, ...]  # per tissue, TISSUES order, LV blood = 1
    gamma: float
    blur_sigma_px: float
    bias_coefficient: float
    rician_sigma: float
    ghosting_probability: float
    ghost_strength: float
    intensity_scale: float
    seed: int

    def with_myocardium(self, value: float) -> ImagingChain:
        """The same chain with myocardial (and myocardium-like) intensity ``value``."""
        intensity = list(self.intensity)
        for name in _MYO_LIKE:
            intensity[TISSUES.index(name)] = value
        return replace(self, intensity=tuple(intensity))


def sample_chain(rng: np.random.Generator, vendor: str) -> ImagingChain:
    """Draw one subject's contrast and degradations from ``vendor``'s ranges."""
    preset = VENDORS[vendor]
    jitter = rng.uniform(0.92, 1.08, size=len(TISSUES))
    intensity = [TISSUE_INTENSITY[name] * float(j) for name, j in zip(TISSUES, jitter, strict=True)]
    intensity[TISSUES.index("lv_blood")] = 1.0
    myo = float(rng.uniform(*preset.myocardium))
    for name in _MYO_LIKE:
        intensity[TISSUES.index(name)] = myo
    return ImagingChain(
        intensity=tuple(intensity),
        gamma=float(rng.uniform(*preset.gamma)),
        blur_sigma_px=float(rng.uniform(*preset.blur_sigma_px)),
        bias_coefficient=float(rng.uniform(*preset.bias_coefficient)),
        rician_sigma=float(rng.uniform(*preset.rician_sigma)),
        ghosting_probability=preset.ghosting_probability,
        ghost_strength=float(rng.uniform(0.12, 0.3)),
        intensity_scale=float(rng.uniform(*preset.intensity_scale)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def texture_amplitudes() -> np.ndarray:
    """Per-tissue texture amplitudes in TISSUES order."""
    return np.array([TISSUE_TEXTURE[name] for name in TISSUES], np.float32)


def bias_pattern(rng: np.random.Generator, order: int = 3) -> tuple[tuple[int, int, float], ...]:
    """Unit coefficients of a polynomial log-bias field (scaled later by the chain's knob)."""
    terms = []
    for total in range(1, order + 1):
        for i in range(total + 1):
            terms.append((i, total - i, float(rng.uniform(-1.0, 1.0)) / total))
    return tuple(terms)


def bias_field(
    shape: tuple[int, int], pattern: tuple[tuple[int, int, float], ...], coefficient: float
) -> np.ndarray:
    """The multiplicative bias field ``exp(coefficient * sum(c_ij x^i y^j))`` over ``shape``."""
    x = np.linspace(-1.0, 1.0, shape[0], dtype=np.float32)[:, None]
    y = np.linspace(-1.0, 1.0, shape[1], dtype=np.float32)[None, :]
    log = np.zeros(shape, np.float32)
    for i, j, c in pattern:
        log += np.float32(c * coefficient) * (x**i) * (y**j)
    return np.exp(log)


def _ghost(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Motion ghosts: replicas shifted by FOV/n along the phase-encoding axis (axis 1)."""
    period = int(rng.integers(2, 5))
    k = np.fft.fft(image, axis=1)
    k[:, ::period] *= 1.0 + strength * period
    return np.abs(np.fft.ifft(k, axis=1)).astype(np.float32) / np.float32(1.0 + strength)


def acquire(
    contrast: np.ndarray, chain: ImagingChain, rng: np.random.Generator, bias: np.ndarray | None
) -> np.ndarray:
    """Apply the acquisition chain to one slice of tissue contrast (LV blood = 1).

    ``bias`` is the slice's multiplicative bias field (:func:`bias_field`), or None for none.
    """
    image = np.maximum(contrast, np.float32(0.0))
    np.power(image, np.float32(chain.gamma), out=image)
    if chain.blur_sigma_px > 0:
        image = ndimage.gaussian_filter(image, chain.blur_sigma_px, mode="nearest", truncate=3.0)
    if bias is not None:
        image *= bias
    # Every random draw happens whatever the knobs, so one knob never shifts another's draws.
    ghost_draw = float(rng.uniform())
    ghost_rng = np.random.default_rng(int(rng.integers(0, 2**31 - 1)))
    noise = rng.standard_normal((2, *image.shape), dtype=np.float32)
    if ghost_draw < chain.ghosting_probability and chain.ghost_strength > 0:
        image = _ghost(image, ghost_rng, chain.ghost_strength)
    sigma = np.float32(chain.rician_sigma)
    if sigma > 0:
        # Rician magnitude |image + sigma * (n0 + i n1)|, in place.
        real, imag = noise
        real *= sigma
        real += image
        real *= real
        imag *= sigma
        imag *= imag
        real += imag
        image = np.sqrt(real, out=real)
    image = image * np.float32(chain.intensity_scale)
    return np.rint(image, out=image)


def ladder_chain(chain: ImagingChain, knob: str, value: float) -> ImagingChain:
    """``chain`` with one intensity knob set to ``value`` (ghosting: strength, always on)."""
    if knob == "myocardium":
        return chain.with_myocardium(value)
    if knob == "ghosting":
        return replace(chain, ghosting_probability=1.0, ghost_strength=value)
    fields = {
        "gamma": "gamma",
        "blur": "blur_sigma_px",
        "bias": "bias_coefficient",
        "noise": "rician_sigma",
        "scale": "intensity_scale",
    }
    if knob not in fields:
        raise ValueError(f"{knob!r} is not an intensity knob")
    return replace(chain, **{fields[knob]: value})
