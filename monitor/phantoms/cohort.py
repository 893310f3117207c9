"""Phantom cohorts: presets, the subject plan, and writing the M&Ms-2 layout.

``out_dir/NNN/NNN_{SA,LA}_{ED,ES}.nii.gz`` (float32 images) with ``..._gt.nii.gz`` beside (uint8
labels 0 bg, 1 LV, 2 MYO, 3 RV), and ``out_dir/dataset_information.csv``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qcloop.monitor.core.progress import progress
from qcloop.monitor.phantoms.anatomy import sample_anatomy
from qcloop.monitor.phantoms.appearance import VENDORS, ladder_chain, sample_chain
from qcloop.monitor.phantoms.nifti import remove_stale_subjects, write_subject
from qcloop.monitor.phantoms.views import (
    Geometry,
    GridSpec,
    render_scenes,
    sample_geometry,
    scenes_to_images,
)

__all__ = [
    "CSV_COLUMNS",
    "LADDER",
    "PRESETS",
    "CohortPreset",
    "CohortSummary",
    "Group",
    "SubjectRecord",
    "plan_cohort",
    "write_cohort",
]

logger = logging.getLogger(__name__)

CSV_NAME = "dataset_information.csv"
#: M&Ms-2's columns, then qcloop's: SPLIT, and the ladder's knob and severity (empty otherwise).
CSV_COLUMNS: tuple[str, ...] = (
    "SUBJECT_CODE",
    "DISEASE",
    "VENDOR",
    "SCANNER",
    "FIELD",
    "SPLIT",
    "SHIFT_KNOB",
    "SHIFT_SEVERITY",
)
#: Severity ladder: knob -> its value at severities 1..5, each knob alone on vendor A.
LADDER: dict[str, tuple[float, ...]] = {
    "spacing": (1.65, 1.8, 2.0, 2.25, 2.5),  # mm (times the preset's spacing scale)
    "rotation": (25.0, 40.0, 60.0, 90.0, 120.0),  # degrees, both views
    "myocardium": (0.40, 0.48, 0.56, 0.64, 0.72),  # relative to LV blood
    "gamma": (1.3, 1.6, 1.9, 2.3, 2.8),
    "blur": (0.9, 1.3, 1.8, 2.4, 3.0),  # PSF sigma, pixels
    "bias": (0.3, 0.45, 0.6, 0.8, 1.0),  # bias-field coefficient
    "noise": (0.05, 0.07, 0.09, 0.12, 0.16),  # Rician sigma
    "ghosting": (0.1, 0.2, 0.3, 0.45, 0.6),  # ghost strength, every slice
    "scale": (400.0, 150.0, 50.0, 15.0, 5.0),  # intensity scale: coarser integer levels
}
_GEOMETRY_KNOBS = ("spacing", "rotation")
_TRAINING = ("NOR", "LV", "HCM")
_ALL = ("NOR", "LV", "HCM", "DRV")


@dataclass(frozen=True)
class Group:
    """``count`` subjects of one split and vendor, diseases shared out evenly."""

    split: str
    vendor: str
    count: int
    diseases: tuple[str, ...]


@dataclass(frozen=True)
class CohortPreset:
    """A named cohort: its groups (in subject-code order), ladder and image grid."""

    name: str
    groups: tuple[Group, ...]
    ladder_subjects: int
    ladder_knobs: tuple[str, ...]
    grid: GridSpec


def _groups(train: int, val: int, test: int, other: int) -> tuple[Group, ...]:
    return (
        Group("train", "A", train, _TRAINING),
        Group("val", "A", val, _TRAINING),
        Group("test", "A", test, _ALL),
        Group("test", "B", other, _ALL),
        Group("test", "C", other, _ALL),
    )


#: Built-in cohorts. Dilated RV never appears in vendor A's train or val splits.
PRESETS: dict[str, CohortPreset] = {
    "default": CohortPreset("default", _groups(60, 10, 20, 20), 2, tuple(LADDER), GridSpec()),
    "small": CohortPreset("small", _groups(16, 4, 6, 6), 1, tuple(LADDER), GridSpec()),
    "tiny": CohortPreset(
        "tiny",
        _groups(4, 2, 4, 4),
        0,
        (),
        GridSpec(
            spacing_scale=2.5,
            fov_mm=(240.0, 280.0),
            matrix=(64, 96),
            slice_gap_mm=16.0,
            slices=(6, 8),
        ),
    ),
}


@dataclass(frozen=True)
class SubjectRecord:
    """One row of ``dataset_information.csv``."""

    code: str
    disease: str
    vendor: str
    split: str
    shift_knob: str = ""
    shift_severity: int | None = None

    def row(self) -> dict[str, str]:
        """The CSV row (M&Ms-2 spelling: integer subject code)."""
        preset = VENDORS[self.vendor]
        return {
            "SUBJECT_CODE": str(int(self.code)),
            "DISEASE": self.disease,
            "VENDOR": self.vendor,
            "SCANNER": preset.scanner,
            "FIELD": f"{preset.field_t:.1f}",
            "SPLIT": self.split,
            "SHIFT_KNOB": self.shift_knob,
            "SHIFT_SEVERITY": "" if self.shift_severity is None else str(self.shift_severity),
        }


@dataclass(frozen=True)
class CohortSummary:
    """What ``write_cohort`` wrote."""

    out_dir: Path
    preset: str
    seed: int
    subjects: tuple[SubjectRecord, ...]
    files: int
    seconds: float

    def counts(self, *fields: str) -> dict[tuple[str, ...], int]:
        """Subjects per value of the record ``fields`` (e.g. ``counts("vendor", "split")``)."""
        tally = Counter(tuple(str(getattr(s, f)) for f in fields) for s in self.subjects)
        return dict(sorted(tally.items()))


@dataclass(frozen=True)
class _Job:
    """Subjects sharing one anatomy, rendered together (ladder variants reuse the scenes)."""

    out_dir: str
    seed: int
    stream: tuple[int, int]
    disease: str
    vendor: str
    grid: GridSpec
    variants: tuple[tuple[SubjectRecord, str, float], ...]  # record, knob ("" none), value


def plan_cohort(preset: str | CohortPreset, seed: int = 0) -> list[SubjectRecord]:
    """The subjects of a cohort, in subject-code order (train, val, test, ladder)."""
    return _records(_plan(_preset(preset), seed, Path(".")))


def _records(jobs: list[_Job]) -> list[SubjectRecord]:
    return sorted((v[0] for job in jobs for v in job.variants), key=lambda r: int(r.code))


def _preset(preset: str | CohortPreset) -> CohortPreset:
    if isinstance(preset, CohortPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def _plan(preset: CohortPreset, seed: int, out_dir: Path) -> list[_Job]:
    n_regular = sum(g.count for g in preset.groups)
    n_ladder = preset.ladder_subjects * 5 * len(preset.ladder_knobs)
    width = max(3, len(str(n_regular + n_ladder)))
    code = (f"{i:0{width}d}" for i in range(1, n_regular + n_ladder + 1))
    jobs: list[_Job] = []
    index = 0
    for g, group in enumerate(preset.groups):
        diseases = [group.diseases[i % len(group.diseases)] for i in range(group.count)]
        np.random.default_rng([seed, 99, g]).shuffle(diseases)
        for disease in diseases:
            record = SubjectRecord(next(code), disease, group.vendor, group.split)
            jobs.append(
                _Job(
                    str(out_dir),
                    seed,
                    (0, index),
                    disease,
                    group.vendor,
                    preset.grid,
                    ((record, "", 0.0),),
                )
            )
            index += 1
    ladder: dict[int, list[tuple[SubjectRecord, str, float]]] = {}
    for knob in preset.ladder_knobs:
        if knob not in LADDER:
            raise ValueError(f"unknown ladder knob {knob!r}; choose from {', '.join(LADDER)}")
        for severity, value in enumerate(LADDER[knob], start=1):
            for base in range(preset.ladder_subjects):
                disease = _TRAINING[base % len(_TRAINING)]
                record = SubjectRecord(next(code), disease, "A", "ladder", knob, severity)
                ladder.setdefault(base, []).append((record, knob, value))
    for base, variants in ladder.items():
        # Geometry knobs need their own rendering; intensity knobs share the base scenes.
        shared = tuple(v for v in variants if v[1] not in _GEOMETRY_KNOBS)
        own = [(v,) for v in variants if v[1] in _GEOMETRY_KNOBS]
        for chunk in [shared, *own]:
            if chunk:
                disease = _TRAINING[base % len(_TRAINING)]
                jobs.append(_Job(str(out_dir), seed, (1, base), disease, "A", preset.grid, chunk))
    return jobs


def _geometry_variant(geo: Geometry, knob: str, value: float, grid: GridSpec) -> Geometry:
    if knob == "spacing":
        spacing = value * grid.spacing_scale
        fov = geo.spacing_mm * geo.matrix
        return replace(
            geo, spacing_mm=spacing, matrix=int(np.clip(round(fov / spacing), *grid.matrix))
        )
    if knob == "rotation":
        return replace(
            geo,
            rotation_sa_deg=math.copysign(value, geo.rotation_sa_deg),
            rotation_la_deg=math.copysign(value, geo.rotation_la_deg),
        )
    return geo


def _run_job(job: _Job) -> int:
    """Render and write every subject of ``job``; returns the number of files written."""
    kind, index = job.stream
    anatomy = sample_anatomy(np.random.default_rng([job.seed, kind, index, 0]), job.disease)
    geometry = sample_geometry(
        np.random.default_rng([job.seed, kind, index, 1]), job.vendor, anatomy, job.grid
    )
    chain = sample_chain(np.random.default_rng([job.seed, kind, index, 2]), job.vendor)
    scenes = None
    contrast: dict = {}
    files = 0
    for record, knob, value in job.variants:
        if knob in _GEOMETRY_KNOBS:
            geo = _geometry_variant(geometry, knob, value, job.grid)
            images = scenes_to_images(render_scenes(anatomy, geo), anatomy, geo, chain)
        else:
            if scenes is None:
                scenes = render_scenes(anatomy, geometry)
            ch = ladder_chain(chain, knob, value) if knob else chain
            images = scenes_to_images(scenes, anatomy, geometry, ch, contrast)
        files += write_subject(Path(job.out_dir), record.code, images)
    return files


def write_cohort(
    out_dir: str | os.PathLike[str],
    preset: str | CohortPreset = "default",
    seed: int = 0,
    workers: int | None = None,
) -> CohortSummary:
    """Write a phantom cohort in the M&Ms-2 layout; the same seed gives identical arrays.

    Args:
        out_dir: the dataset folder (created; a previous phantom cohort there is replaced).
        preset: ``"default"``, ``"small"``, ``"tiny"`` or a :class:`CohortPreset`.
        seed: seed of every random draw.
        workers: processes; ``None`` uses every CPU, 1 renders in this process.

    Raises:
        FileExistsError: ``out_dir`` holds files that are not a phantom cohort.
    """
    start = time.perf_counter()
    spec = _preset(preset)
    out = Path(out_dir)
    jobs = _plan(spec, seed, out)
    records = _records(jobs)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_subjects(out, CSV_NAME, {r.code for r in records})
    # Biggest jobs first so that the pool ends evenly.
    ordered = sorted(jobs, key=lambda j: -len(j.variants))
    workers = os.cpu_count() or 1 if workers is None else max(1, workers)
    files = 0
    if workers == 1 or len(ordered) == 1:
        for job in progress(ordered, desc="phantoms"):
            files += _run_job(job)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(ordered)), mp_context=ctx) as pool:
            for n in progress(pool.map(_run_job, ordered), desc="phantoms", total=len(ordered)):
                files += n
    _write_csv(out / CSV_NAME, records)
    seconds = time.perf_counter() - start
    logger.info("%s: %d subjects, %d files in %.1f s", out, len(records), files + 1, seconds)
    return CohortSummary(out, spec.name, seed, tuple(records), files + 1, seconds)


def _write_csv(path: Path, records: list[SubjectRecord]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow(record.row())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)
