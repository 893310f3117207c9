"""The phantom scene: tissues as implicit shapes, rendered on any image plane.

Every tissue is an implicit function of a point of the short-axis frame (negative inside, about
a distance in mm near its surface). A plane is rendered layer by layer in painting order: each
layer's partial-volume coverage of a pixel is its area fraction under a box pixel, estimated
from the implicit value and its gradient (analytic supersampling, exact for straight edges),
and the ground truth takes, at each pixel centre, the label of the last layer covering it.
Coverage depends on geometry only, so one rendering serves any tissue contrast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qcloop.monitor.phantoms.anatomy import Anatomy, HeartPhase

__all__ = [
    "TISSUES",
    "TISSUE_LABELS",
    "Plane",
    "SceneLayers",
    "composite",
    "render_phases",
    "render_plane",
]

#: Tissue classes in a fixed order (the index is used by intensity vectors).
TISSUES: tuple[str, ...] = (
    "air",
    "fat",
    "muscle",
    "soft",
    "lung",
    "liver",
    "bone",
    "marrow",
    "csf",
    "vessel",
    "atrium",
    "rv_wall",
    "rv_blood",
    "myocardium",
    "lv_blood",
    "papillary",
)
#: Ground-truth label of each tissue: papillary muscles belong to the LV cavity (challenge rule).
TISSUE_LABELS: dict[str, int] = {"rv_blood": 3, "myocardium": 2, "lv_blood": 1, "papillary": 1}
_T = {name: i for i, name in enumerate(TISSUES)}
_STRIDE = 4  # coarse grid: texture and layer windows
_Points = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Plane:
    """An image plane in the short-axis frame: pixel (i, j) is at ``origin + i*step_i + j*step_j``."""

    origin: tuple[float, float, float]
    step_i: tuple[float, float, float]
    step_j: tuple[float, float, float]
    shape: tuple[int, int]

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(u, v, z)`` coordinates (mm, float32) of every pixel centre."""
        i = np.arange(self.shape[0], dtype=np.float32)[:, None]
        j = np.arange(self.shape[1], dtype=np.float32)[None, :]
        return tuple(
            (i * np.float32(a) + np.float32(o)) + j * np.float32(b)
            for o, a, b in zip(self.origin, self.step_i, self.step_j, strict=True)
        )  # type: ignore[return-value]


@dataclass
class SceneLayers:
    """A rendered plane: per-layer coverage, the label map and the tissue texture field."""

    layers: list[tuple[int, tuple[slice, slice], np.ndarray]]
    labels: np.ndarray
    texture: np.ndarray


def render_plane(anatomy: Anatomy, phase: str, plane: Plane) -> SceneLayers:
    """Render ``anatomy`` at ``phase`` (``"ED"``/``"ES"``) on ``plane``."""
    return render_phases(anatomy, (phase,), plane)[phase]


def render_phases(
    anatomy: Anatomy, phases: tuple[str, ...], plane: Plane
) -> dict[str, SceneLayers]:
    """Render ``anatomy`` at several phases on one ``plane``; the body around the heart does not
    move between phases, so it is rendered once and shared."""
    u, v, z = plane.points()
    shape = plane.shape
    coarse = _coarse(plane).points()
    texture = _texture(anatomy, coarse, shape)
    far = np.float32(2.0 * math.hypot(*plane.step_i))

    def painter(layers: list, labels: np.ndarray):
        def paint(tissue: str, f: np.ndarray, win: tuple[slice, slice]) -> None:
            if float(f.min()) > far:
                return  # no pixel of this window touches the tissue
            layers.append((_T[tissue], win, _coverage(f)))
            labels[win][f < 0] = TISSUE_LABELS.get(tissue, 0)

        return paint

    context: list = []
    _paint_body(painter(context, np.zeros(shape, np.uint8)), anatomy, u, v, z, coarse)
    out = {}
    for phase in phases:
        scene = SceneLayers(layers=list(context), labels=np.zeros(shape, np.uint8), texture=texture)
        paint = painter(scene.layers, scene.labels)
        _paint_heart(paint, anatomy.heart, anatomy.phase(phase), u, v, z, coarse)
        out[phase] = scene
    return out


def _paint_body(paint, anatomy: Anatomy, u, v, z, coarse: _Points) -> None:
    """Torso, lungs, liver, spine and descending aorta (all labelled background)."""
    body = anatomy.body
    shape = u.shape
    full = (slice(0, shape[0]), slice(0, shape[1]))
    # Torso: subcutaneous fat, then chest-wall muscle, then the thoracic soft tissue.
    cu, cv = body.torso_centre
    au, av = body.torso_size
    paint("fat", _ellipse(u - cu, v - cv, au, av), full)
    inset = body.subcutaneous_fat
    paint("muscle", _ellipse(u - cu, v - cv, au - inset, av - inset), full)
    inset += body.chest_muscle
    thorax = _ellipse(u - cu, v - cv, au - inset, av - inset)
    paint("soft", thorax, full)
    for lung in body.lungs:
        win = _window(coarse, shape, lung[0], lung[1], max(lung[3], lung[4]) + 6)
        if win is not None:
            f = _ellipsoid(u[win] - lung[0], v[win] - lung[1], z[win] - lung[2], *lung[3:])
            paint("lung", np.maximum(f, thorax[win] + 4.0), win)
    lv_u, lv_v, lv_z, la_u, la_v, la_z = body.liver
    win = _window(coarse, shape, lv_u, lv_v, max(la_u, la_v) + 6)
    if win is not None:
        f = _ellipsoid(u[win] - lv_u, v[win] - lv_v, z[win] - lv_z, la_u, la_v, la_z)
        paint("liver", np.maximum(f, thorax[win] + 2.0), win)
    su, sv, sr = body.spine
    win = _window(coarse, shape, su, sv, sr + 6)
    if win is not None:
        paint("bone", _ellipse(u[win] - su, v[win] - sv, sr + 2.0, sr + 1.5), win)
        paint("marrow", _ellipse(u[win] - su, v[win] - sv, sr, sr - 0.5), win)
    win = _window(coarse, shape, su, sv + sr + 10.0, 14.0)
    if win is not None:
        paint("bone", _ellipse(u[win] - su, v[win] - sv - sr - 10.0, 9.0, 8.0), win)
        paint("csf", _ellipse(u[win] - su, v[win] - sv - sr - 10.0, 6.0, 5.5), win)
    au_, av_, ar = body.aorta
    win = _window(coarse, shape, au_, av_, ar + 6)
    if win is not None:
        paint("vessel", _ellipse(u[win] - au_, v[win] - av_, ar, ar), win)


@dataclass
class _HeartFrame:
    """Points of the window around the heart in the heart's frame: ``x`` towards the RV centre,
    polar ``r``, ``theta``, and ``zeta`` (mm below the valve plane) with its range."""

    win: tuple[slice, slice]
    x: np.ndarray
    y: np.ndarray
    r: np.ndarray
    theta: np.ndarray
    zeta: np.ndarray
    z_lo: float
    z_hi: float


def _heart_frame(heart, hp: HeartPhase, u, v, z, coarse: _Points) -> _HeartFrame | None:
    """The heart's frame on the window around the heart (None when the plane misses it)."""
    reach = hp.epi_radius * 1.2 + hp.rv_width + 20.0
    reach = max(reach, hp.epi_radius + heart.ra_size[0] * 1.2 + 20.0)
    win = _window(coarse, u.shape, 0.0, 0.0, reach, (hp.base - 75.0, hp.apex + 8.0))
    if win is None:
        return None
    u, v, zeta = u[win], v[win], z[win] - np.float32(hp.base)
    ca, sa = math.cos(heart.rv_angle), math.sin(heart.rv_angle)
    x = u * ca + v * sa  # towards the RV centre
    y = -u * sa + v * ca
    return _HeartFrame(
        win=win,
        x=x,
        y=y,
        r=np.hypot(x, y),
        theta=np.arctan2(y, x),
        zeta=zeta,
        z_lo=float(zeta.min()),
        z_hi=float(zeta.max()),
    )


def _paint_heart(paint, heart, hp: HeartPhase, u, v, z, coarse: _Points) -> None:
    """Epicardial fat, atria and aortic root, RV (free wall, cavity), LV (myocardium, cavity,
    papillary muscles), in painting order, in a window around the heart."""
    f = _heart_frame(heart, hp, u, v, z, coarse)
    if f is None:
        return
    endo, epi = _wall_profiles(heart, hp, f)
    above = -f.zeta  # > 0 above the valve plane
    epi_r = hp.epi_radius * epi
    f_epi = _spheroid(f.r, f.zeta, epi_r, hp.epi_length)
    # Epicardial surface radius at this height (0 beyond the apex): the RV wraps around it.
    r_epi = epi_r * np.sqrt(np.clip(1.0 - (f.zeta / hp.epi_length) ** 2, 0.0, 1.0))
    has_rv = f.z_lo < hp.rv_length
    if has_rv:
        f_rv_wall, f_rv = _right_ventricle(heart, hp, f, r_epi, above)
        envelope = np.minimum(f_epi, f_rv_wall)
    else:
        envelope = f_epi
    paint("fat", np.maximum(envelope - _fat_thickness(heart, f), above - 4.0), f.win)
    if f.z_lo < 0:
        _paint_atria_and_root(paint, heart, hp, f)
    if has_rv:
        paint("rv_wall", f_rv_wall, f.win)
        paint("rv_blood", f_rv, f.win)
    if f.z_lo >= hp.epi_length or f.z_hi <= 0:
        return
    paint("myocardium", f_epi, f.win)
    f_cav = _spheroid(f.r, f.zeta, hp.cavity_radius * endo, hp.cavity_length)
    paint("lv_blood", f_cav, f.win)
    mid, half = 0.5 * hp.cavity_length, 0.25 * hp.cavity_length
    if f.z_lo < mid + half and f.z_hi > mid - half:
        for angle in heart.papillary_angles:
            # Inside the cavity only: labelled LV, never pushing into the myocardium.
            papillary = _papillary(f.x, f.y, f.zeta, hp, angle)
            paint("papillary", np.maximum(papillary, f_cav), f.win)


def _wall_profiles(heart, hp: HeartPhase, f: _HeartFrame) -> tuple[np.ndarray, np.ndarray]:
    """Relative endocardial and epicardial radii by angle: ellipticity, ripples, the septal
    bulge and the D-shape's flattened septum."""
    theta, zeta = f.theta, f.zeta
    shape = heart.ellipticity * np.cos(2 * (theta - heart.ellipse_angle))
    endo = 1.0 + shape + _ripple(theta, heart.endo_ripple)
    epi = 1.0 + shape + _ripple(theta, heart.epi_ripple)
    if hp.septal_bulge > 0:
        height = np.exp(-((((zeta / hp.cavity_length) - 0.35) / 0.3) ** 2))
        endo = endo - (hp.septal_bulge / hp.cavity_radius) * np.exp(-((theta / 0.6) ** 2)) * height
    if heart.d_shape < 1.0:
        flat = heart.d_shape * hp.cavity_radius
        safe = np.maximum(np.cos(theta), 1e-3)
        endo = np.minimum(endo, flat / (hp.cavity_radius * safe))
        epi = np.minimum(epi, (flat + hp.epi_radius - hp.cavity_radius) / (hp.epi_radius * safe))
    return endo, epi


def _right_ventricle(
    heart, hp: HeartPhase, f: _HeartFrame, r_epi: np.ndarray, above: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Implicit RV free wall (outer surface) and cavity, wrapped around the epicardium."""
    span = f.theta - heart.rv_skew
    along = np.clip(np.abs(span) / heart.rv_half_span, 0.0, 1.0)
    taper = np.clip(1.0 - (np.maximum(f.zeta, 0.0) / hp.rv_length) ** 3, 0.0, 1.0) ** 0.6
    width = hp.rv_width * np.maximum(np.cos(0.5 * math.pi * along), 0.0) ** 0.4 * taper
    rv_outer = r_epi + width
    wall = heart.rv_free_wall * np.minimum(1.0, 3.0 * taper)
    angular = (np.abs(span) - heart.rv_half_span) * np.maximum(r_epi, 10.0)
    beyond = f.zeta - hp.rv_length
    inner = r_epi - 3.0 - f.r
    bounds = np.maximum(np.maximum(inner, beyond), above)
    f_rv_wall = np.maximum(np.maximum(bounds, f.r - rv_outer - wall), angular - 6.0)
    f_rv = np.maximum(np.maximum(bounds, f.r - rv_outer), angular)
    return f_rv_wall, f_rv


def _fat_thickness(heart, f: _HeartFrame) -> np.ndarray:
    """Epicardial fat thickness (mm) by angle."""
    t0, t1, p1, t2, p2 = heart.fat
    # The angular variation fades near the long axis, where the angle is undefined.
    vary = (t1 * np.cos(f.theta - p1) + t2 * np.cos(2 * f.theta - p2)) * np.minimum(f.r / 15.0, 1.0)
    return np.maximum(t0 + vary, 0.0)


def _paint_atria_and_root(paint, heart, hp: HeartPhase, f: _HeartFrame) -> None:
    """Both atria (wall, then blood) and the aortic root (wall, then lumen) above the valves."""
    x, y, zeta = f.x, f.y, f.zeta
    f_atria = np.minimum(
        _atrium(x, y, zeta, heart.la_size, -0.35 * hp.epi_radius, -0.3 * hp.epi_radius, hp),
        _atrium(
            x,
            y,
            zeta,
            heart.ra_size,
            hp.epi_radius + 0.5 * heart.ra_size[0],
            -0.15 * hp.epi_radius,
            hp,
        ),
    )
    rad = heart.aortic_root
    f_ao = _ellipse(x - 0.3 * hp.epi_radius, y - 0.6 * hp.epi_radius, rad, rad)
    f_ao = np.maximum(np.maximum(f_ao, zeta - 1.0), -zeta - 45.0)
    paint("muscle", np.maximum(f_atria - 1.2, zeta), f.win)
    paint("atrium", np.maximum(f_atria, zeta), f.win)
    paint("muscle", f_ao - 1.5, f.win)
    paint("vessel", f_ao, f.win)


def _atrium(x, y, zeta, size, cx: float, cy: float, hp: HeartPhase) -> np.ndarray:
    """An atrium: an ellipsoid above the valve plane (implicit value, not yet cut at the base)."""
    a, b, c = (s * hp.atrial_scale for s in size)
    return _ellipsoid(x - cx, y - cy, zeta + 0.75 * c, a, b, c)


def _papillary(x, y, zeta, hp: HeartPhase, angle: float) -> np.ndarray:
    """A papillary muscle: a spindle along the free wall through the mid-ventricle."""
    ring = hp.cavity_radius * np.sqrt(np.clip(1.0 - (zeta / hp.cavity_length) ** 2, 0.0, 1.0))
    rho = hp.papillary_radius
    dist = np.maximum(ring - rho - 1.5, 0.0)
    px, py = dist * math.cos(angle), dist * math.sin(angle)
    along = (zeta - 0.5 * hp.cavity_length) / (0.25 * hp.cavity_length)
    spindle = rho * (np.sqrt((np.hypot(x - px, y - py) / rho) ** 2 + along**2) - 1.0)
    return np.maximum(spindle, 2.5 * rho - ring)


def _ripple(theta: np.ndarray, ripple: tuple[tuple[float, float], ...]) -> np.ndarray:
    out = np.zeros_like(theta)
    for k, (amp, phase) in enumerate(ripple, start=3):
        out += amp * np.cos(k * theta + phase)
    return out


def _spheroid(r: np.ndarray, zeta: np.ndarray, radius: np.ndarray, length: float) -> np.ndarray:
    """Truncated half-spheroid (base at ``zeta = 0``), implicit value in about mm."""
    q = (r / radius) ** 2 + (zeta / length) ** 2
    return np.maximum(0.5 * (q - 1.0) * radius, -zeta)


def _ellipse(du: np.ndarray, dv: np.ndarray, a: float, b: float) -> np.ndarray:
    return 0.25 * (a + b) * ((du / a) ** 2 + (dv / b) ** 2 - 1.0)


def _ellipsoid(du, dv, dz, a: float, b: float, c: float) -> np.ndarray:
    return (a + b + c) / 6.0 * ((du / a) ** 2 + (dv / b) ** 2 + (dz / c) ** 2 - 1.0)


def _window(
    coarse: _Points,
    shape: tuple[int, int],
    cu: float,
    cv: float,
    half: float,
    zrange: tuple[float, float] | None = None,
) -> tuple[slice, slice] | None:
    """A pixel box holding every pixel of the plane inside a square prism around (cu, cv) (found
    on the coarse grid, widened by one coarse cell), or None if there is none."""
    u, v, z = coarse
    inside = (np.abs(u - np.float32(cu)) < half) & (np.abs(v - np.float32(cv)) < half)
    if zrange is not None:
        inside &= (z > zrange[0]) & (z < zrange[1])
    rows = np.flatnonzero(inside.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(inside.any(axis=0))
    return (
        slice(
            max(0, (int(rows[0]) - 1) * _STRIDE), min(shape[0], (int(rows[-1]) + 1) * _STRIDE + 1)
        ),
        slice(
            max(0, (int(cols[0]) - 1) * _STRIDE), min(shape[1], (int(cols[-1]) + 1) * _STRIDE + 1)
        ),
    )


def _coverage(f: np.ndarray) -> np.ndarray:
    """Area fraction of each pixel inside ``f < 0``: 0.5 - f / (|df/di| + |df/dj|), clipped.

    For a straight edge this is the box-filtered (infinitely supersampled) coverage; the pixel
    derivatives are central differences (one-sided at the border).
    """
    if f.shape[0] < 3 or f.shape[1] < 3:
        return (f < 0).astype(np.float32)
    grad = np.empty_like(f)
    tmp = np.empty_like(f)
    np.subtract(f[2:], f[:-2], out=grad[1:-1])
    grad[0] = f[1] - f[0]
    grad[-1] = f[-1] - f[-2]
    grad[0] *= 2
    grad[-1] *= 2
    np.subtract(f[:, 2:], f[:, :-2], out=tmp[:, 1:-1])
    tmp[:, 0] = f[:, 1] - f[:, 0]
    tmp[:, -1] = f[:, -1] - f[:, -2]
    tmp[:, 0] *= 2
    tmp[:, -1] *= 2
    np.abs(grad, out=grad)
    np.abs(tmp, out=tmp)
    grad += tmp
    grad *= np.float32(0.5)
    np.maximum(grad, np.float32(1e-3), out=grad)
    np.divide(f, grad, out=grad)
    np.subtract(np.float32(0.5), grad, out=grad)
    return np.clip(grad, 0.0, 1.0, out=grad)


def _coarse(plane: Plane) -> Plane:
    """Every ``_STRIDE``-th pixel of ``plane``, one sample past its far edges."""
    n_i, n_j = plane.shape
    return Plane(
        plane.origin,
        tuple(_STRIDE * a for a in plane.step_i),
        tuple(_STRIDE * b for b in plane.step_j),
        ((n_i - 1) // _STRIDE + 2, (n_j - 1) // _STRIDE + 2),
    )


def _texture(anatomy: Anatomy, coarse: _Points, shape: tuple[int, int]) -> np.ndarray:
    """A smooth zero-mean tissue texture fixed to the anatomy (standard deviation about 1).

    Evaluated on the coarse grid and interpolated bilinearly (its wavelengths are >= 14 mm).
    """
    u, v, z = coarse
    waves = anatomy.body.texture
    grid = np.zeros(u.shape, np.float32)
    for ku, kv, kz, phase in waves:
        grid += np.cos(u * np.float32(ku) + v * np.float32(kv) + (z * np.float32(kz) + phase))
    grid *= np.float32(math.sqrt(2.0 / len(waves)))
    rows = _linear(grid, shape[0], _STRIDE, axis=0)
    return _linear(rows, shape[1], _STRIDE, axis=1)


def _linear(a: np.ndarray, n: int, stride: int, axis: int) -> np.ndarray:
    idx = np.arange(n)
    lo = idx // stride
    w = (idx % stride).astype(np.float32) / np.float32(stride)
    if axis == 0:
        return a[lo] * (1 - w)[:, None] + a[lo + 1] * w[:, None]
    return a[:, lo] * (1 - w)[None, :] + a[:, lo + 1] * w[None, :]


def composite(
    scene: SceneLayers, intensity: np.ndarray, texture_amplitude: np.ndarray
) -> np.ndarray:
    """The partial-volume image of ``scene`` for per-tissue intensities (indexed as TISSUES)."""
    image = np.full(scene.labels.shape, np.float32(intensity[0]), np.float32)
    for tissue, win, alpha in scene.layers:
        value = np.float32(intensity[tissue])
        region = image[win]
        # region += alpha * (value * (1 + amp * texture) - region), with one temporary.
        step = scene.texture[win] * (value * np.float32(texture_amplitude[tissue]))
        step += value
        step -= region
        step *= alpha
        region += step
    return image
