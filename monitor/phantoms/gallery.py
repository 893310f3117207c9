"""The phantom gallery for the docs: example slices per vendor and per pathology.

matplotlib (Agg) is imported when a figure is drawn, never at module import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qcloop.monitor.phantoms.anatomy import DISEASES, Anatomy, sample_anatomy
from qcloop.monitor.phantoms.appearance import VENDORS, sample_chain
from qcloop.monitor.phantoms.views import Geometry, SubjectImages, render_subject, sample_geometry

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["mid_slice", "pathology_figure", "vendor_figure", "write_gallery"]

#: Contour colours of LV cavity, epicardium (LV + MYO) and RV.
_CONTOURS = (((1,), "#ff4040"), ((1, 2), "#40e040"), ((3,), "#40a0ff"))


def mid_slice(anatomy: Anatomy, geometry: Geometry, fraction: float = 0.4) -> int:
    """Index of the short-axis slice nearest ``fraction`` of the way from base to apex (ED)."""
    target = fraction * anatomy.phase("ED").apex
    z = geometry.first_slice_mm + geometry.slice_gap_mm * np.arange(geometry.n_slices)
    return int(np.argmin(np.abs(z - target)))


def _subject(
    seed: int, index: int, disease: str, vendor: str
) -> tuple[Anatomy, Geometry, SubjectImages]:
    anatomy = sample_anatomy(np.random.default_rng([seed, 7, index, 0]), disease)
    geometry = sample_geometry(np.random.default_rng([seed, 7, index, 1]), vendor, anatomy)
    chain = sample_chain(np.random.default_rng([seed, 7, index, 2]), vendor)
    return anatomy, geometry, render_subject(anatomy, geometry, chain)


#: Fraction of the field of view shown (centred): the heart fills about a third of the image.
CROP = 0.65


def _crop(a: np.ndarray) -> np.ndarray:
    n0, n1 = a.shape
    k0, k1 = round(n0 * (1 - CROP) / 2), round(n1 * (1 - CROP) / 2)
    return a[k0 : n0 - k0, k1 : n1 - k1]


def _show(ax: Axes, image: np.ndarray, labels: np.ndarray | None, title: str) -> None:
    image = _crop(image)
    labels = None if labels is None else _crop(labels)
    lo, hi = np.percentile(image, [0.5, 99.5])
    ax.imshow(image.T, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
    if labels is not None:
        for values, colour in _CONTOURS:
            mask = np.isin(labels.T, values).astype(np.float32)
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=colour, linewidths=0.7)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def vendor_figure(seed: int = 0) -> Figure:
    """Two subjects (NOR, HCM) imaged by each vendor: SA mid-ventricular ED and LA ED."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 9), dpi=100)
    axes = fig.subplots(len(VENDORS), 4)
    for row, vendor in enumerate(VENDORS):
        for s, disease in enumerate(("NOR", "HCM")):
            # Same anatomy for every vendor (same index), different acquisition.
            anatomy = sample_anatomy(np.random.default_rng([seed, 7, s, 0]), disease)
            geometry = sample_geometry(np.random.default_rng([seed, 7, s, 1]), vendor, anatomy)
            chain = sample_chain(np.random.default_rng([seed, 7, s, 3 + row]), vendor)
            images = render_subject(anatomy, geometry, chain)
            k = mid_slice(anatomy, geometry)
            contour = s == 1
            sa = images.labels["SA", "ED"][:, :, k] if contour else None
            la = images.labels["LA", "ED"][:, :, 0] if contour else None
            name = f"vendor {vendor} {disease}"
            _show(axes[row, 2 * s], images.images["SA", "ED"][:, :, k], sa, f"{name} SA ED")
            _show(axes[row, 2 * s + 1], images.images["LA", "ED"][:, :, 0], la, f"{name} LA ED")
    fig.tight_layout()
    return fig


def pathology_figure(seed: int = 0) -> Figure:
    """One vendor-A subject per disease: SA at ED and ES (mid and apical), LA at ED and ES."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 10.5), dpi=100)
    axes = fig.subplots(len(DISEASES), 6)
    for row, disease in enumerate(DISEASES):
        anatomy, geometry, images = _subject(seed, 10 + row, disease, "A")
        mid, apical = mid_slice(anatomy, geometry, 0.4), mid_slice(anatomy, geometry, 0.75)
        panels = [
            ("SA", "ED", mid, "SA ED mid"),
            ("SA", "ES", mid, "SA ES mid"),
            ("SA", "ED", apical, "SA ED apical"),
            ("SA", "ES", apical, "SA ES apical"),
            ("LA", "ED", 0, "LA ED"),
            ("LA", "ES", 0, "LA ES"),
        ]
        for col, (view, phase, k, title) in enumerate(panels):
            image = images.images[view, phase][:, :, k]
            labels = images.labels[view, phase][:, :, k]
            _show(axes[row, col], image, labels, f"{disease} {title}")
    fig.tight_layout()
    return fig


def write_gallery(out_dir: str | os.PathLike[str], seed: int = 0) -> list[Path]:
    """Write ``phantom-vendors.png`` and ``phantom-pathologies.png`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in (
        ("phantom-vendors.png", vendor_figure),
        ("phantom-pathologies.png", pathology_figure),
    ):
        fig = make(seed)
        path = out / name
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        written.append(path)
    return written
