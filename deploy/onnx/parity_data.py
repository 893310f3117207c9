"""Slices for the parity check, preprocessed exactly as at inference: a few cases of a dataset
folder (``--data``, else the run's data folder), else phantoms rendered in memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.deploy.onnx.errors import ExportError

__all__ = ["ParityData", "parity_slices"]


@dataclass
class ParityData:
    """Preprocessed slices of one view for the parity check, and where they came from."""

    images: np.ndarray  # float32 (Z, S, S)
    source: str  # "run-data", "data-option" or "phantoms-in-memory"
    path: str | None
    cases: list[str]

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for the manifest."""
        return {
            "source": self.source,
            "path": self.path,
            "cases": list(self.cases),
            "slices": len(self.images),
        }


def _sample_evenly(items: Sequence[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


def _slices_from_folder(
    root: Path, view: str, preprocessor: Any, max_cases: int, source: str
) -> ParityData:
    from qcloop.monitor.data import CaseError, discover, load_case

    try:
        sources = [s for s in discover(root, views=[view]) if s.view == view]
    except (CaseError, OSError, ValueError) as exc:
        raise ExportError(f"cannot read parity data: {exc}") from exc
    # LA views hold one slice per case: take more cases so the check sees several slices.
    wanted = max_cases if view == "SA" else max_cases * 4
    images, keys, errors = [], [], []
    for src in _sample_evenly(sorted(sources, key=lambda s: s.key), wanted):
        try:
            prepared = preprocessor.prepare(load_case(src))
        except (CaseError, ValueError) as exc:
            errors.append(str(exc))
            continue
        images.append(prepared.image)
        keys.append(src.key)
    if not images:
        detail = f" ({len(errors)} unreadable: {errors[0]})" if errors else ""
        raise ExportError(f"{root}: no usable {view} case for the parity check{detail}")
    return ParityData(np.concatenate(images).astype(np.float32), source, str(root), keys)


def _phantom_slices(view: str, preprocessor: Any, n_subjects: int, seed: int) -> ParityData:
    from qcloop.monitor.phantoms import (
        VENDORS,
        render_subject,
        sample_anatomy,
        sample_chain,
        sample_geometry,
    )

    vendors = list(VENDORS)
    n = n_subjects if view == "SA" else n_subjects * 4
    images, keys = [], []
    for i in range(n):
        vendor = vendors[i % len(vendors)]
        anatomy = sample_anatomy(np.random.default_rng([seed, i, 0]))
        geometry = sample_geometry(np.random.default_rng([seed, i, 1]), vendor, anatomy)
        chain = sample_chain(np.random.default_rng([seed, i, 2]), vendor)
        rendered = render_subject(anatomy, geometry, chain)
        spacing = tuple(float(s) for s in np.linalg.norm(rendered.affines[view][:3, :3], axis=0))
        for phase in ("ED", "ES"):
            volume = rendered.images[view, phase]
            transform = preprocessor.transform_for(volume.shape, spacing)
            normalised = preprocessor.normalise(volume)
            fill = float(normalised.min()) if normalised.size else 0.0
            images.append(transform.apply_image(normalised, fill=fill))
            keys.append(f"phantom-{seed}-{i}/{view}/{phase}")
    return ParityData(np.concatenate(images).astype(np.float32), "phantoms-in-memory", None, keys)


def parity_slices(
    view: str,
    preprocessor: Any,
    *,
    run_data: Path | None,
    data: Path | None,
    max_cases: int = 4,
    seed: int = 0,
) -> ParityData:
    """Slices for the parity check: ``data`` if given, else the run's data folder if it exists,
    else phantoms rendered in memory."""
    if data is not None:
        if not Path(data).is_dir():
            raise ExportError(f"{data}: --data is not a folder")
        return _slices_from_folder(Path(data), view, preprocessor, max_cases, "data-option")
    if run_data is not None and Path(run_data).is_dir():
        return _slices_from_folder(Path(run_data), view, preprocessor, max_cases, "run-data")
    return _phantom_slices(view, preprocessor, max(1, max_cases // 2), seed)
