"""Acquisition geometry of a phantom subject (grid, slices, rotation, world affine) and the
rendering of its four images: short axis (SA) and 4-chamber long axis (LA) at ED and ES."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qcloop.monitor.phantoms.anatomy import Anatomy
from qcloop.monitor.phantoms.appearance import (
    VENDORS,
    ImagingChain,
    acquire,
    bias_field,
    bias_pattern,
    texture_amplitudes,
)
from qcloop.monitor.phantoms.scene import Plane, SceneLayers, composite, render_phases

__all__ = [
    "PHASES",
    "VIEWS",
    "Geometry",
    "GridSpec",
    "SubjectImages",
    "render_scenes",
    "render_subject",
    "sample_geometry",
    "scenes_to_images",
]

VIEWS: tuple[str, ...] = ("SA", "LA")
PHASES: tuple[str, ...] = ("ED", "ES")


@dataclass(frozen=True)
class GridSpec:
    """How a cohort preset sizes images: spacing scale, field of view and slice stack."""

    spacing_scale: float = 1.0
    fov_mm: tuple[float, float] = (260.0, 320.0)
    matrix: tuple[int, int] = (96, 320)
    slice_gap_mm: float = 10.0
    slices: tuple[int, int] = (9, 12)


@dataclass(frozen=True)
class Geometry:
    """Where and how a subject is imaged; the same for both phases."""

    spacing_mm: float
    matrix: int
    rotation_sa_deg: float
    rotation_la_deg: float
    centre_offset_mm: tuple[float, float]
    first_slice_mm: float
    n_slices: int
    slice_gap_mm: float
    orientation_deg: tuple[float, float, float]  # world rotation of the short-axis frame
    position_mm: tuple[float, float, float]  # world position of the LV base centre


@dataclass
class SubjectImages:
    """The four images of one subject: ``images[(view, phase)]`` etc.; arrays are (X, Y, Z)."""

    images: dict[tuple[str, str], np.ndarray]
    labels: dict[tuple[str, str], np.ndarray]
    affines: dict[str, np.ndarray]


def sample_geometry(
    rng: np.random.Generator, vendor: str, anatomy: Anatomy, grid: GridSpec | None = None
) -> Geometry:
    """Draw one subject's imaging geometry from ``vendor``'s ranges and the preset ``grid``."""
    grid = grid or GridSpec()
    preset = VENDORS[vendor]
    spacing = float(rng.uniform(*preset.spacing_mm)) * grid.spacing_scale
    fov = float(rng.uniform(*grid.fov_mm))
    matrix = int(np.clip(round(fov / spacing), *grid.matrix))
    rot = preset.rotation_deg
    first = float(rng.uniform(-10.0, -2.0))
    apex = anatomy.phase("ED").apex
    n = int(np.clip(math.ceil((apex + 4.0 - first) / grid.slice_gap_mm) + 1, *grid.slices))
    return Geometry(
        spacing_mm=spacing,
        matrix=matrix,
        rotation_sa_deg=float(rng.uniform(-rot, rot)),
        rotation_la_deg=float(rng.uniform(-rot, rot)),
        centre_offset_mm=(float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8))),
        first_slice_mm=first,
        n_slices=n,
        slice_gap_mm=grid.slice_gap_mm,
        orientation_deg=(
            float(rng.uniform(-130, -100)),
            float(rng.uniform(25, 45)),
            float(rng.uniform(-60, -30)),
        ),
        position_mm=(
            float(rng.uniform(-15, 15)),
            float(rng.uniform(-10, 30)),
            float(rng.uniform(-20, 20)),
        ),
    )


def _rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    a, b, c = (math.radians(x) for x in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _heart_centre(anatomy: Anatomy) -> np.ndarray:
    """In-plane point between LV and RV that the field of view is centred on (mm)."""
    h = anatomy.heart
    reach = 0.35 * (h.lv_radius + h.wall + 0.5 * h.rv_width)
    return np.array([math.cos(h.rv_angle), math.sin(h.rv_angle)]) * reach


def _planes(anatomy: Anatomy, geo: Geometry) -> tuple[list[Plane], Plane]:
    n, h = geo.matrix, geo.spacing_mm
    centre = _heart_centre(anatomy) + np.asarray(geo.centre_offset_mm)
    phi = math.radians(geo.rotation_sa_deg)
    ei = np.array([math.cos(phi), math.sin(phi), 0.0]) * h
    ej = np.array([-math.sin(phi), math.cos(phi), 0.0]) * h
    half = (n - 1) / 2.0
    sa = []
    for k in range(geo.n_slices):
        z = geo.first_slice_mm + k * geo.slice_gap_mm
        origin = np.array([centre[0], centre[1], z]) - half * (ei + ej)
        sa.append(Plane(tuple(origin), tuple(ei), tuple(ej), (n, n)))
    # 4-chamber plane: contains the long axis and the RV direction; RV to the left, apex up.
    a = anatomy.heart.rv_angle
    d = np.array([math.cos(a), math.sin(a), 0.0])
    right, down = -d, np.array([0.0, 0.0, -1.0])
    psi = math.radians(geo.rotation_la_deg)
    li = (right * math.cos(psi) + down * math.sin(psi)) * h
    lj = (-right * math.sin(psi) + down * math.cos(psi)) * h
    hp = anatomy.phase("ED")
    la_centre = 0.3 * hp.epi_radius * d + np.array([0.0, 0.0, 0.5 * hp.apex - 22.0])
    # In-plane jitter only: the plane keeps containing the long axis.
    la_centre[:2] += d[:2] * float(np.dot(geo.centre_offset_mm, d[:2]))
    la = Plane(tuple(la_centre - half * (li + lj)), tuple(li), tuple(lj), (n, n))
    return sa, la


def _affine(plane: Plane, step_k: np.ndarray, geo: Geometry) -> np.ndarray:
    rot = _rotation(geo.orientation_deg)
    m = np.eye(4)
    m[:3, 0] = rot @ np.asarray(plane.step_i)
    m[:3, 1] = rot @ np.asarray(plane.step_j)
    m[:3, 2] = rot @ step_k
    m[:3, 3] = rot @ np.asarray(plane.origin) + np.asarray(geo.position_mm)
    return m


def render_scenes(anatomy: Anatomy, geometry: Geometry) -> dict[tuple[str, str], list[SceneLayers]]:
    """Geometry-only renderings (coverage and labels) of every slice of the four images."""
    sa, la = _planes(anatomy, geometry)
    out: dict[tuple[str, str], list[SceneLayers]] = {}
    for view, planes in (("SA", sa), ("LA", [la])):
        rendered = [render_phases(anatomy, PHASES, p) for p in planes]
        for phase in PHASES:
            out[view, phase] = [r[phase] for r in rendered]
    return out


def _affines(anatomy: Anatomy, geometry: Geometry) -> dict[str, np.ndarray]:
    sa, la = _planes(anatomy, geometry)
    sa_aff = _affine(sa[0], np.array([0.0, 0.0, geometry.slice_gap_mm]), geometry)
    normal = np.cross(la.step_i, la.step_j)
    normal = normal / np.linalg.norm(normal) * 8.0
    return {"SA": sa_aff, "LA": _affine(la, normal, geometry)}


def scenes_to_images(
    scenes: dict[tuple[str, str], list[SceneLayers]],
    anatomy: Anatomy,
    geometry: Geometry,
    chain: ImagingChain,
    contrast_cache: dict | None = None,
) -> SubjectImages:
    """Apply ``chain`` to rendered scenes: the subject's images, labels and affines.

    ``contrast_cache`` (a dict kept by the caller for these scenes) reuses the tissue-contrast
    images of chains that share ``chain.intensity``.
    """
    intensity = np.asarray(chain.intensity, np.float32)
    amplitude = texture_amplitudes()
    cache = {} if contrast_cache is None else contrast_cache
    images, labels = {}, {}
    for view in VIEWS:
        # One coil: the same bias pattern for both phases of a view.
        pattern = bias_pattern(np.random.default_rng([chain.seed, VIEWS.index(view)]))
        shape = scenes[view, PHASES[0]][0].labels.shape
        bias = (
            bias_field(shape, pattern, chain.bias_coefficient) if chain.bias_coefficient else None
        )
        for p, phase in enumerate(PHASES):
            rng = np.random.default_rng([chain.seed, VIEWS.index(view), p + 1])
            slices = scenes[view, phase]
            key = (chain.intensity, view, phase)
            if key not in cache:
                cache[key] = [composite(s, intensity, amplitude) for s in slices]
            images[view, phase] = np.stack(
                [acquire(c, chain, rng, bias) for c in cache[key]], axis=-1
            )
            labels[view, phase] = np.stack([s.labels for s in slices], axis=-1)
    return SubjectImages(images=images, labels=labels, affines=_affines(anatomy, geometry))


def render_subject(anatomy: Anatomy, geometry: Geometry, chain: ImagingChain) -> SubjectImages:
    """Render one subject's four images (SA and LA at ED and ES) with their labels.

    Labels depend on ``anatomy`` and ``geometry`` only: two chains give the same labels.
    """
    return scenes_to_images(render_scenes(anatomy, geometry), anatomy, geometry, chain)
