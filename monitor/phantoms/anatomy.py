"""Phantom anatomy: the parameter set of one subject, drawn once, and its shape at ED and ES.

Coordinates (mm) are those of the short-axis frame: ``u`` to the image right, ``v`` down the
image, ``z`` along the left-ventricular long axis from the base (``z = 0`` at end-diastole)
towards the apex. The LV long axis is the line ``u = v = 0``; the right ventricle lies in the
direction ``rv_angle`` (display angle from ``+u`` towards ``+v``). One ``Anatomy`` drives every
short-axis slice, both phases and the long-axis view, so the views agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DISEASES",
    "Anatomy",
    "BodyParameters",
    "HeartParameters",
    "HeartPhase",
    "sample_anatomy",
]

#: Disease codes as M&Ms-2 spells them: normal, dilated LV, hypertrophic CM, dilated RV.
DISEASES: dict[str, str] = {
    "NOR": "normal",
    "LV": "dilated left ventricle",
    "HCM": "hypertrophic cardiomyopathy",
    "DRV": "dilated right ventricle",
}


@dataclass(frozen=True)
class HeartParameters:
    """End-diastolic heart shape and its contraction to end-systole (lengths in mm)."""

    lv_radius: float  # cavity radius at the base
    lv_length: float  # cavity length, base to endocardial apex
    wall: float  # myocardial wall thickness
    apex_wall: float  # wall thickness at the apex
    ellipticity: float  # in-plane elliptical deformation of the LV outline
    ellipse_angle: float  # rad
    endo_ripple: tuple[tuple[float, float], ...]  # (amplitude, phase) of harmonics 3, 4, 5
    epi_ripple: tuple[tuple[float, float], ...]
    septal_bulge: float  # extra septal thickness, mm (HCM)
    d_shape: float  # septal flattening: line at this fraction of the radius; 1 = none
    rv_angle: float  # rad, display angle of the RV centre
    rv_width: float  # RV cavity width at the base
    rv_half_span: float  # rad, angular half-extent of the crescent
    rv_skew: float  # rad, shift of the crescent's widest point
    rv_length: float  # RV cavity ends at this height, before the apex
    rv_free_wall: float
    papillary_angles: tuple[float, float]  # rad, relative to the septum direction
    papillary_radius: float
    fat: tuple[float, float, float, float, float]  # t0, t1, phase1, t2, phase2 (mm, rad)
    la_size: tuple[float, float, float]  # left-atrium semi-axes (x, y, z)
    ra_size: tuple[float, float, float]
    aortic_root: float  # radius
    es_radius: float  # LV cavity radius factor ED -> ES
    es_shortening: float  # fraction of long-axis shortening ED -> ES
    es_rv: float  # RV width factor ED -> ES


@dataclass(frozen=True)
class BodyParameters:
    """Thorax context around the heart (lengths in mm, positions relative to the LV axis)."""

    torso_centre: tuple[float, float]
    torso_size: tuple[float, float]
    subcutaneous_fat: float
    chest_muscle: float
    lungs: tuple[tuple[float, ...], tuple[float, ...]]  # (u, v, z, a_u, a_v, a_z) each
    liver: tuple[float, float, float, float, float, float]
    spine: tuple[float, float, float]  # u, v, radius
    aorta: tuple[float, float, float]  # u, v, radius
    texture: tuple[tuple[float, float, float, float], ...]  # plane waves: k_u, k_v, k_z, phase


@dataclass(frozen=True)
class Anatomy:
    """Everything that describes one subject's body, independent of the scanner."""

    disease: str
    heart: HeartParameters
    body: BodyParameters

    def phase(self, phase: str) -> HeartPhase:
        """The heart's shape at ``"ED"`` or ``"ES"``."""
        if phase == "ED":
            return _ed_shape(self.heart)
        if phase == "ES":
            return _es_shape(self.heart)
        raise ValueError(f"phase must be 'ED' or 'ES', got {phase!r}")


@dataclass(frozen=True)
class HeartPhase:
    """Heart shape at one cardiac phase (mm); ``base`` is the valve plane's height."""

    base: float
    cavity_radius: float
    cavity_length: float
    epi_radius: float
    epi_length: float
    rv_width: float
    rv_length: float
    papillary_radius: float
    atrial_scale: float
    septal_bulge: float

    @property
    def apex(self) -> float:
        """Height of the epicardial apex."""
        return self.base + self.epi_length


def _ed_shape(h: HeartParameters) -> HeartPhase:
    return HeartPhase(
        base=0.0,
        cavity_radius=h.lv_radius,
        cavity_length=h.lv_length,
        epi_radius=h.lv_radius + h.wall,
        epi_length=h.lv_length + h.apex_wall,
        rv_width=h.rv_width,
        rv_length=h.rv_length,
        papillary_radius=h.papillary_radius,
        atrial_scale=1.0,
        septal_bulge=h.septal_bulge,
    )


def _es_shape(h: HeartParameters) -> HeartPhase:
    rc, lc = h.lv_radius * h.es_radius, h.lv_length * (1.0 - h.es_shortening)
    kappa = h.apex_wall / h.wall
    myo = (h.lv_radius + h.wall) ** 2 * (h.lv_length + h.apex_wall) - h.lv_radius**2 * h.lv_length
    wall = _wall_for_volume(rc, lc, kappa, myo)
    epi_ed = h.lv_length + h.apex_wall
    epi_es = lc + kappa * wall
    # The apex barely moves: most of the shortening is the base descending.
    base = 0.75 * (epi_ed - epi_es)
    return HeartPhase(
        base=base,
        cavity_radius=rc,
        cavity_length=lc,
        epi_radius=rc + wall,
        epi_length=epi_es,
        rv_width=h.rv_width * h.es_rv,
        rv_length=h.rv_length * epi_es / epi_ed,
        papillary_radius=h.papillary_radius * 1.2,
        atrial_scale=1.12,
        septal_bulge=h.septal_bulge * wall / h.wall,
    )


def _wall_for_volume(rc: float, lc: float, kappa: float, myo: float) -> float:
    """Wall thickness whose half-ellipsoid shell has the myocardial volume ``myo`` (bisection)."""
    lo, hi = 0.0, 80.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if (rc + mid) ** 2 * (lc + kappa * mid) - rc**2 * lc < myo:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def sample_anatomy(rng: np.random.Generator, disease: str = "NOR") -> Anatomy:
    """Draw one subject's anatomy for a disease code of :data:`DISEASES`."""
    if disease not in DISEASES:
        raise ValueError(f"unknown disease {disease!r}; choose one of {', '.join(DISEASES)}")
    return Anatomy(disease=disease, heart=_sample_heart(rng, disease), body=_sample_body(rng))


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _ripple(rng: np.random.Generator, amplitude: float) -> tuple[tuple[float, float], ...]:
    return tuple((_u(rng, 0.3, 1.0) * amplitude, _u(rng, 0, 2 * math.pi)) for _ in range(3))


def _sample_heart(rng: np.random.Generator, disease: str) -> HeartParameters:
    # Every draw happens whatever the disease, so subjects differ only where the disease does.
    radius = _u(rng, 22.0, 27.0)
    length = _u(rng, 78.0, 95.0)
    wall = _u(rng, 7.0, 10.0)
    apex_ratio = _u(rng, 0.55, 0.7)
    rv_width = _u(rng, 14.0, 24.0)
    rv_half_span = math.radians(_u(rng, 70.0, 85.0))
    rv_length = _u(rng, 0.72, 0.84)
    es_radius = _u(rng, 0.62, 0.72)
    es_shortening = _u(rng, 0.12, 0.20)
    es_rv = _u(rng, 0.55, 0.70)
    bulge = 0.0
    d_shape = 1.0
    # Pathologies: the disease factors are drawn for everyone (fixed stream), used where needed.
    dlv_radius, dlv_wall = _u(rng, 1.25, 1.45), _u(rng, 5.0, 6.5)
    dlv_es, dlv_short, dlv_length = _u(rng, 0.82, 0.92), _u(rng, 0.04, 0.09), _u(rng, 1.0, 1.08)
    hcm_wall, hcm_bulge, hcm_radius = _u(rng, 15.0, 24.0), _u(rng, 3.0, 7.0), _u(rng, 0.75, 0.85)
    drv_width, drv_flat, drv_span = _u(rng, 1.5, 1.9), _u(rng, 0.62, 0.8), _u(rng, 1.1, 1.25)
    drv_es = _u(rng, 0.72, 0.85)
    if disease == "LV":
        radius *= dlv_radius
        wall = dlv_wall
        es_radius, es_shortening = dlv_es, dlv_short
        length *= dlv_length
    elif disease == "HCM":
        radius *= hcm_radius
        wall = hcm_wall
        bulge = hcm_bulge
    elif disease == "DRV":
        rv_width *= drv_width
        d_shape = drv_flat
        rv_half_span = min(rv_half_span * drv_span, math.radians(100.0))
        rv_length = min(rv_length + 0.06, 0.9)
        es_rv = drv_es
    epi_length = length + apex_ratio * wall
    return HeartParameters(
        lv_radius=radius,
        lv_length=length,
        wall=wall,
        apex_wall=apex_ratio * wall,
        ellipticity=_u(rng, 0.02, 0.07),
        ellipse_angle=_u(rng, 0, math.pi),
        endo_ripple=_ripple(rng, 0.025),
        epi_ripple=_ripple(rng, 0.012),
        septal_bulge=bulge,
        d_shape=d_shape,
        rv_angle=math.radians(_u(rng, 195.0, 220.0)),
        rv_width=rv_width,
        rv_half_span=rv_half_span,
        rv_skew=math.radians(_u(rng, -12.0, 12.0)),
        # The RV ends well before the apex, whatever the slice gap (checked by the tests).
        rv_length=min(rv_length * epi_length, epi_length - 20.0),
        rv_free_wall=_u(rng, 2.0, 3.0),
        papillary_angles=(math.radians(_u(rng, 115, 135)), math.radians(_u(rng, -135, -115))),
        papillary_radius=_u(rng, 2.5, 4.0),
        fat=(
            _u(rng, 0.5, 2.5),
            _u(rng, 1.5, 3.5),
            _u(rng, 0, 2 * math.pi),
            _u(rng, 0.5, 2.0),
            _u(rng, 0, 2 * math.pi),
        ),
        la_size=(_u(rng, 22, 28), _u(rng, 18, 24), _u(rng, 28, 34)),
        ra_size=(_u(rng, 21, 27), _u(rng, 18, 24), _u(rng, 28, 34)),
        aortic_root=_u(rng, 11.0, 14.0),
        es_radius=es_radius,
        es_shortening=es_shortening,
        es_rv=es_rv,
    )


def _sample_body(rng: np.random.Generator) -> BodyParameters:
    j = lambda s: _u(rng, -s, s)  # noqa: E731 - a local jitter shorthand
    waves = []
    for _ in range(16):
        direction = rng.normal(size=3)
        direction /= float(np.linalg.norm(direction)) or 1.0
        k = 2 * math.pi / _u(rng, 14.0, 60.0)
        waves.append((*(float(c) * k for c in direction), _u(rng, 0, 2 * math.pi)))
    return BodyParameters(
        torso_centre=(-20.0 + j(8), 40.0 + j(8)),
        torso_size=(175.0 + j(12), 130.0 + j(10)),
        subcutaneous_fat=_u(rng, 7.0, 16.0),
        chest_muscle=_u(rng, 7.0, 12.0),
        lungs=(
            (80.0 + j(6), 15.0 + j(8), -15.0 + j(10), 55.0 + j(6), 85.0 + j(8), 135.0 + j(15)),
            (-112.0 + j(6), 15.0 + j(8), -20.0 + j(10), 60.0 + j(6), 90.0 + j(8), 140.0 + j(15)),
        ),
        liver=(-70.0 + j(8), 75.0 + j(6), 150.0 + j(12), 105.0 + j(8), 80.0 + j(6), 95.0 + j(8)),
        spine=(-5.0 + j(6), 102.0 + j(6), _u(rng, 15.0, 19.0)),
        aorta=(26.0 + j(5), 80.0 + j(5), _u(rng, 10.0, 13.0)),
        texture=tuple(waves),
    )
