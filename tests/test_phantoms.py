"""Phantom cohorts: layout, CSV, determinism, anatomy and vendor shift, read back with nibabel."""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import click
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from qcloop.monitor.phantoms import (
    CSV_COLUMNS,
    LADDER,
    PRESETS,
    CohortPreset,
    GridSpec,
    Group,
    plan_cohort,
    render_subject,
    sample_anatomy,
    sample_chain,
    sample_geometry,
    write_cohort,
)
from qcloop.monitor.phantoms.appearance import ladder_chain

TINY = PRESETS["tiny"]
FILE = re.compile(r"^(\d{3})_(SA|LA)_(ED|ES)(_gt)?\.nii\.gz$")
# DATA.md's vendor table (in-plane spacing, mm) times the tiny preset's spacing scale 2.5.
SPACING = {"A": (3.25, 3.75), "B": (2.75, 3.125), "C": (4.25, 4.75)}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "cohort"
    summary = write_cohort(out, preset="tiny", seed=0, workers=2)
    assert summary.files == len(summary.subjects) * 8 + 1
    return out


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "dataset_information.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine, img


def _labels(root: Path, code: str, view: str, phase: str) -> np.ndarray:
    return _load(root / code / f"{code}_{view}_{phase}_gt.nii.gz")[0]


def test_layout_and_file_names(cohort: Path) -> None:
    rows = _rows(cohort)
    folders = sorted(p.name for p in cohort.iterdir() if p.is_dir())
    assert folders == [f"{i:03d}" for i in range(1, 19)]  # 4 + 2 + 4 + 4 + 4 subjects
    assert [int(r["SUBJECT_CODE"]) for r in rows] == list(range(1, 19))
    for folder in folders:
        names = sorted(p.name for p in (cohort / folder).iterdir())
        expected = sorted(
            f"{folder}_{v}_{p}{gt}.nii.gz"
            for v in ("SA", "LA")
            for p in ("ED", "ES")
            for gt in ("", "_gt")
        )
        assert names == expected
        assert all(FILE.match(n) for n in names)


def test_csv_columns_and_splits(cohort: Path) -> None:
    with open(cohort / "dataset_information.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header == [
        "SUBJECT_CODE",
        "DISEASE",
        "VENDOR",
        "SCANNER",
        "FIELD",
        "SPLIT",
        "SHIFT_KNOB",
        "SHIFT_SEVERITY",
    ]
    assert tuple(header) == CSV_COLUMNS
    rows = _rows(cohort)
    splits = [(r["VENDOR"], r["SPLIT"]) for r in rows]
    # Codes: vendor A training first, then validation, then the test subjects of A, B, C.
    assert (
        splits
        == [("A", "train")] * 4
        + [("A", "val")] * 2
        + [("A", "test")] * 4
        + [("B", "test")] * 4
        + [("C", "test")] * 4
    )
    for r in rows:
        assert r["DISEASE"] in {"NOR", "LV", "HCM", "DRV"}
        assert r["SHIFT_KNOB"] == "" and r["SHIFT_SEVERITY"] == ""
        assert float(r["FIELD"]) in (1.5, 3.0)
        assert r["SCANNER"]


def test_dilated_rv_only_in_test_splits(cohort: Path) -> None:
    rows = _rows(cohort)
    assert {r["SPLIT"] for r in rows if r["DISEASE"] == "DRV"} == {"test"}
    for vendor in "ABC":
        assert any(r["DISEASE"] == "DRV" and r["VENDOR"] == vendor for r in rows)
    for name in ("default", "small", "tiny"):
        for s in plan_cohort(name):
            if s.disease == "DRV":
                assert s.split == "test"


def test_default_plan_counts() -> None:
    subjects = plan_cohort("default", seed=0)
    tally: dict[tuple[str, str], int] = {}
    for s in subjects:
        tally[s.vendor, s.split] = tally.get((s.vendor, s.split), 0) + 1
    assert tally == {
        ("A", "train"): 60,
        ("A", "val"): 10,
        ("A", "test"): 20,
        ("B", "test"): 20,
        ("C", "test"): 20,
        ("A", "ladder"): 9 * 5 * 2,
    }
    assert [s.code for s in subjects] == [f"{i:03d}" for i in range(1, len(subjects) + 1)]
    order = {"train": 0, "val": 1, "test": 2, "ladder": 3}
    ranks = [order[s.split] for s in subjects]
    assert ranks == sorted(ranks)
    ladder = [s for s in subjects if s.split == "ladder"]
    assert {s.shift_knob for s in ladder} == set(LADDER)
    assert {s.shift_severity for s in ladder} == {1, 2, 3, 4, 5}


def test_images_labels_dtypes_and_shapes(cohort: Path) -> None:
    for r in _rows(cohort):
        code = f"{int(r['SUBJECT_CODE']):03d}"
        for view in ("SA", "LA"):
            for phase in ("ED", "ES"):
                image, affine, img = _load(cohort / code / f"{code}_{view}_{phase}.nii.gz")
                labels, gt_affine, _ = _load(cohort / code / f"{code}_{view}_{phase}_gt.nii.gz")
                assert image.dtype == np.float32 and labels.dtype == np.uint8
                assert image.shape == labels.shape and image.ndim == 3
                assert 64 <= image.shape[0] == image.shape[1] <= 96
                if view == "SA":
                    assert 6 <= image.shape[2] <= 8
                else:
                    assert image.shape[2] == 1
                assert np.isfinite(image).all() and image.min() >= 0
                assert set(np.unique(labels)) <= {0, 1, 2, 3}
                np.testing.assert_array_equal(affine, gt_affine)
                assert int(img.header["sform_code"]) > 0


def test_affine_spacing_matches_vendor(cohort: Path) -> None:
    for r in _rows(cohort):
        code = f"{int(r['SUBJECT_CODE']):03d}"
        lo, hi = SPACING[r["VENDOR"]]
        _, sa, _ = _load(cohort / code / f"{code}_SA_ED.nii.gz")
        _, la, _ = _load(cohort / code / f"{code}_LA_ED.nii.gz")
        zooms = np.linalg.norm(sa[:3, :3], axis=0)
        assert lo <= zooms[0] <= hi and zooms[1] == pytest.approx(zooms[0])
        assert zooms[2] == pytest.approx(16.0)  # the tiny preset's slice gap
        assert np.linalg.norm(la[:3, :3], axis=0)[:2] == pytest.approx([zooms[0], zooms[0]])
        # A rotated (non-trivial) but valid affine: orthogonal axes.
        axes = sa[:3, :3] / zooms
        np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-6)
        assert abs(axes[0, 0]) < 0.999


def test_every_structure_in_mid_slices(cohort: Path) -> None:
    for r in _rows(cohort):
        code = f"{int(r['SUBJECT_CODE']):03d}"
        for phase in ("ED", "ES"):
            labels = _labels(cohort, code, "SA", phase)
            mid = labels[:, :, (labels.shape[2] - 1) // 2]
            for value in (1, 2, 3):
                assert (mid == value).sum() >= 5, (code, phase, value)
            la = _labels(cohort, code, "LA", phase)
            assert {1, 2, 3} <= set(np.unique(la))


def test_rv_absent_at_the_apex(cohort: Path) -> None:
    for r in _rows(cohort):
        code = f"{int(r['SUBJECT_CODE']):03d}"
        for phase in ("ED", "ES"):
            labels = _labels(cohort, code, "SA", phase)
            with_myo = [k for k in range(labels.shape[2]) if (labels[:, :, k] == 2).any()]
            apex = labels[:, :, with_myo[-1]]
            assert not (apex == 3).any(), (code, phase)
            assert (labels == 3).any()


def test_lv_cavity_smaller_at_es(cohort: Path) -> None:
    for r in _rows(cohort):
        code = f"{int(r['SUBJECT_CODE']):03d}"
        ed = (_labels(cohort, code, "SA", "ED") == 1).sum()
        es = (_labels(cohort, code, "SA", "ES") == 1).sum()
        assert es < 0.9 * ed, (code, r["DISEASE"], ed, es)


def test_vendor_intensity_statistics_differ(cohort: Path) -> None:
    blood: dict[str, list[float]] = {"A": [], "B": [], "C": []}
    spread: dict[str, list[float]] = {"A": [], "B": [], "C": []}
    ratio: dict[str, list[float]] = {"A": [], "B": [], "C": []}
    for r in _rows(cohort):
        code = f"{int(r['SUBJECT_CODE']):03d}"
        image = _load(cohort / code / f"{code}_SA_ED.nii.gz")[0]
        labels = _labels(cohort, code, "SA", "ED")
        inner = ndimage.binary_erosion(labels == 1, structure=np.ones((3, 3, 1)))
        values = image[inner]
        lv = float(np.median(values))
        blood[r["VENDOR"]].append(lv)
        spread[r["VENDOR"]].append(float(np.median(np.abs(values - lv))) / lv)
        ratio[r["VENDOR"]].append(float(np.median(image[labels == 2])) / lv)
    # Intensity scales of the vendor table: B x150-300, A x800-1200, C x2000-4000.
    assert max(blood["B"]) < min(blood["A"]) and max(blood["A"]) < min(blood["C"])
    # Rician noise: sigma 0.02-0.04 (A) against 0.05-0.07 (B) and 0.06-0.09 (C).
    assert np.median(spread["B"]) > 1.3 * np.median(spread["A"])
    assert np.median(spread["C"]) > 1.3 * np.median(spread["A"])
    # Brighter myocardium on B (0.36-0.44, gamma < 1) than on A (0.24-0.32).
    assert np.median(ratio["B"]) > np.median(ratio["A"]) + 0.1


def test_vendor_contrast_at_full_resolution() -> None:
    """Same anatomy and grid, three vendors' chains: myocardium/blood contrast B > A > C."""
    rng = np.random.default_rng(5)
    anatomy = sample_anatomy(rng, "NOR")
    geometry = sample_geometry(rng, "A", anatomy)
    geometry = dataclasses.replace(geometry, n_slices=9)
    ratios = {}
    for vendor in "ABC":
        images = render_subject(anatomy, geometry, sample_chain(rng, vendor))
        image, labels = images.images["SA", "ED"], images.labels["SA", "ED"]
        core = np.ones((3, 3, 1))
        lv = np.median(image[ndimage.binary_erosion(labels == 1, core)])
        myo = np.median(image[ndimage.binary_erosion(labels == 2, core)])
        ratios[vendor] = myo / lv
    assert ratios["B"] > ratios["A"] > ratios["C"]
    assert 0.2 < ratios["A"] < 0.4  # DATA.md: myocardium 0.24-0.32 of blood, gamma ~1


def test_same_seed_same_arrays_any_workers(cohort: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        _cli(), ["phantoms", str(tmp_path / "again"), "--preset", "tiny", "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "18 subjects" in result.output and "A train" in result.output
    for path in sorted(cohort.glob("*/*.nii.gz")):
        other = tmp_path / "again" / path.parent.name / path.name
        a, affine_a, _ = _load(path)
        b, affine_b, _ = _load(other)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(affine_a, affine_b)
        assert path.read_bytes() == other.read_bytes()


def test_different_seed_differs(tmp_path: Path) -> None:
    one = CohortPreset("one", (Group("train", "A", 1, ("NOR",)),), 0, (), TINY.grid)
    write_cohort(tmp_path / "s0", one, seed=0, workers=1)
    write_cohort(tmp_path / "s1", one, seed=1, workers=1)
    a = _load(tmp_path / "s0" / "001" / "001_SA_ED.nii.gz")[0]
    b = _load(tmp_path / "s1" / "001" / "001_SA_ED.nii.gz")[0]
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_labels_unchanged_by_the_intensity_chain() -> None:
    rng = np.random.default_rng(3)
    anatomy = sample_anatomy(rng, "HCM")
    geometry = sample_geometry(rng, "A", anatomy, TINY.grid)
    chain_a, chain_c = sample_chain(rng, "A"), sample_chain(rng, "C")
    images_a = render_subject(anatomy, geometry, chain_a)
    images_c = render_subject(anatomy, geometry, chain_c)
    blurred = render_subject(anatomy, geometry, ladder_chain(chain_a, "blur", 3.0))
    for key in images_a.labels:
        np.testing.assert_array_equal(images_a.labels[key], images_c.labels[key])
        np.testing.assert_array_equal(images_a.labels[key], blurred.labels[key])
        assert not np.allclose(images_a.images[key], images_c.images[key])
    # A geometry knob does change the labels.
    rotated = render_subject(anatomy, dataclasses.replace(geometry, rotation_sa_deg=60.0), chain_a)
    assert not np.array_equal(rotated.labels["SA", "ED"], images_a.labels["SA", "ED"])


def test_ladder_rows_and_knobs(tmp_path: Path) -> None:
    preset = CohortPreset(
        "ladder", (Group("train", "A", 1, ("NOR",)),), 1, ("noise", "spacing"), TINY.grid
    )
    summary = write_cohort(tmp_path / "c", preset, seed=0, workers=1)
    rows = _rows(tmp_path / "c")
    assert [r["SPLIT"] for r in rows] == ["train"] + ["ladder"] * 10
    ladder = rows[1:]
    assert [(r["SHIFT_KNOB"], r["SHIFT_SEVERITY"]) for r in ladder] == [
        ("noise", str(s)) for s in range(1, 6)
    ] + [("spacing", str(s)) for s in range(1, 6)]
    assert {r["VENDOR"] for r in ladder} == {"A"}
    assert summary.counts("split") == {("ladder",): 10, ("train",): 1}
    root = tmp_path / "c"
    # Noise knob: one anatomy and geometry, so identical labels, and noisier air each step.
    base = _labels(root, "002", "SA", "ED")
    air = []
    for code in ("002", "003", "004", "005", "006"):
        np.testing.assert_array_equal(_labels(root, code, "SA", "ED"), base)
        image = _load(root / code / f"{code}_SA_ED.nii.gz")[0]
        air.append(float(image[:6, :6, :].std()))
    assert air == sorted(air)
    # Spacing knob: the ladder's spacing (times the tiny scale), coarser each step.
    spacings = [
        float(np.linalg.norm(_load(root / f"{c:03d}" / f"{c:03d}_SA_ED.nii.gz")[1][:3, 0]))
        for c in range(7, 12)
    ]
    assert spacings == pytest.approx([v * 2.5 for v in LADDER["spacing"]])


def test_refuses_a_folder_that_is_not_a_cohort(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_cohort(tmp_path, "tiny", workers=1)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_unknown_preset_and_disease() -> None:
    with pytest.raises(ValueError, match="preset"):
        plan_cohort("huge")
    with pytest.raises(ValueError, match="disease"):
        sample_anatomy(np.random.default_rng(0), "ARR")


def test_grid_spec_defaults_are_realistic() -> None:
    grid = GridSpec()
    assert grid.slice_gap_mm == 10.0 and grid.slices == (9, 12)
    assert 260 <= grid.fov_mm[0] < grid.fov_mm[1] <= 320


@pytest.mark.slow
def test_gallery_writes_pngs(tmp_path: Path) -> None:
    from qcloop.monitor.phantoms.gallery import write_gallery

    paths = write_gallery(tmp_path, seed=0)
    assert [p.name for p in paths] == ["phantom-vendors.png", "phantom-pathologies.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cli() -> click.Group:
    from qcloop.monitor.cli.main import cli

    return cli
