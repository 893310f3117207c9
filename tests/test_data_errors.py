"""Every kind of bad input gives a ``CaseError`` naming the file and the problem, and a batch with
one bad case keeps the others."""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qcloop.monitor.data import CaseError, CaseSource, load_case, load_cases
from qcloop.monitor.data.readers import ACDC_LABELS

SPACING = (1.37, 1.37, 10.0)
SHAPE = (64, 64, 3)


def affine_for(spacing=SPACING) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-30.0, 12.0, 4.0)
    return affine


def write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, affine_for() if affine is None else affine), path)
    return path


def good_labels(shape=SHAPE) -> np.ndarray:
    gt = np.zeros(shape, np.uint8)
    gt[20:30, 20:30] = 1
    gt[30:34, 20:30] = 2
    gt[40:50, 40:44] = 3
    return gt


def source(tmp_path: Path, name: str = "001", image=None, gt=None, **kwargs) -> CaseSource:
    """A case with a valid image and ground truth unless replaced."""
    image_path = tmp_path / f"{name}_SA_ED.nii.gz"
    gt_path = tmp_path / f"{name}_SA_ED_gt.nii.gz"
    write(image_path, np.ones(SHAPE, np.float32) if image is None else image)
    write(gt_path, good_labels() if gt is None else gt)
    return CaseSource(name, "SA", "ED", image_path, gt_path, layout="mnms2", **kwargs)


def assert_case_error(src: CaseSource, path: Path, *phrases: str) -> CaseError:
    with pytest.raises(CaseError) as info:
        load_case(src)
    message = str(info.value)
    assert str(path) in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert info.value.path == path and info.value.key == src.key
    return info.value


def patch_pixdim(path: Path, axis: int, value: float) -> None:
    """Rewrite pixdim[axis] in the file's bytes (nibabel fixes it from the affine on save)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[76 + 4 * axis : 80 + 4 * axis] = struct.pack("<f", value)
    path.write_bytes(gzip.compress(bytes(raw)))


def test_truncated_gzip_is_reported_not_raised_raw(tmp_path):
    src = source(tmp_path, image=np.random.default_rng(0).random(SHAPE).astype(np.float32))
    data = src.image_path.read_bytes()
    src.image_path.write_bytes(data[: len(data) // 2])
    assert_case_error(src, src.image_path, "truncated or corrupt")


def test_file_that_is_not_nifti(tmp_path):
    src = source(tmp_path)
    src.gt_path.write_bytes(b"\x1f\x8b\x08 this is not gzip")
    assert_case_error(src, src.gt_path, "not a readable NIfTI")


def test_missing_file(tmp_path):
    src = source(tmp_path)
    src.gt_path.unlink()
    assert_case_error(src, src.gt_path, "not found")


def test_4d_with_several_frames_is_refused_but_singleton_4d_and_2d_are_accepted(tmp_path):
    cine = source(tmp_path, image=np.ones((*SHAPE, 5), np.float32))
    assert_case_error(cine, cine.image_path, "wrong dimensionality", "(64, 64, 3, 5)")

    singleton = source(tmp_path, "002", image=np.ones((*SHAPE, 1), np.float32))
    assert load_case(singleton).shape == SHAPE

    flat = source(tmp_path, "003", image=np.ones((64, 64), np.float32), gt=good_labels()[..., 0])
    case = load_case(flat)
    assert case.shape == (64, 64, 1) and case.gt.shape == (64, 64, 1)


def test_one_dimensional_image_is_refused(tmp_path):
    src = source(tmp_path, image=np.ones(64, np.float32))
    assert_case_error(src, src.image_path, "wrong dimensionality", "1D")


def test_frame_out_of_range_and_frame_of_a_3d_file(tmp_path):
    cine = source(
        tmp_path, image=np.ones((*SHAPE, 4), np.float32), gt=np.zeros((*SHAPE, 4), np.uint8)
    )
    cine = CaseSource("001", "SA", "ED", cine.image_path, cine.gt_path, frame=4)
    assert_case_error(cine, cine.image_path, "frame 4 is out of range", "4 frames")
    flat = source(tmp_path, "002", frame=1)
    assert_case_error(flat, flat.image_path, "expected a 4D cine file")


def test_shape_mismatch(tmp_path):
    src = source(tmp_path, gt=good_labels((64, 60, 3)))
    assert_case_error(src, src.gt_path, "shape (64, 60, 3) does not match", "(64, 64, 3)")


def test_affine_mismatch_beyond_tolerance(tmp_path):
    shifted = affine_for()
    shifted[0, 3] += 2.0
    src = source(tmp_path)
    write(src.gt_path, good_labels(), shifted)
    assert_case_error(src, src.gt_path, "affine differs", "by up to 2")
    # Float rounding between the two files is tolerated.
    nearly = affine_for()
    nearly[0, 3] += 1e-5
    write(src.gt_path, good_labels(), nearly)
    assert load_case(src).gt is not None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(tmp_path, bad):
    image = np.ones(SHAPE, np.float32)
    image[3, 4, 1] = bad
    image[5, 5, 2] = bad
    src = source(tmp_path, image=image)
    assert_case_error(src, src.image_path, "2 NaN/Inf voxel(s)")


@pytest.mark.parametrize(("axis", "value"), [(1, 0.0), (2, -1.37), (3, float("nan"))])
def test_zero_negative_or_nan_spacing(tmp_path, axis, value):
    src = source(tmp_path)
    patch_pixdim(src.image_path, axis, value)
    assert_case_error(src, src.image_path, "voxel spacing")


def test_spacing_in_metres_is_converted_to_mm(tmp_path):
    nii = nib.Nifti1Image(np.ones(SHAPE, np.float32), affine_for((0.00137, 0.00137, 0.01)))
    nii.header.set_xyzt_units("meter")
    src = source(tmp_path)
    nib.save(nii, src.image_path)
    src.gt_path.unlink()
    case = load_case(CaseSource("001", "SA", "ED", src.image_path, None))
    assert case.spacing == pytest.approx(SPACING, rel=1e-5)


def test_label_values_outside_the_convention_are_named(tmp_path):
    gt = good_labels()
    gt[0, 0, 0] = 7
    gt[1, 0, 0] = 5
    src = source(tmp_path, gt=gt)
    error = assert_case_error(src, src.gt_path, "label values outside {0, 1, 2, 3}: 5, 7")
    assert "7" in error.reason


def test_fractional_and_negative_labels_are_named(tmp_path):
    gt = good_labels().astype(np.float32)
    gt[0, 0, 0] = 1.5
    gt[2, 0, 0] = -1
    src = source(tmp_path, gt=gt)
    assert_case_error(src, src.gt_path, "-1, 1.5")
    # Float files holding whole numbers are fine, and ACDC's reversed labels still map.
    acdc = source(tmp_path, "002", gt=good_labels().astype(np.float32), label_map=ACDC_LABELS)
    case = load_case(acdc)
    assert case.gt.dtype == np.uint8
    assert case.gt[25, 25, 0] == 3 and case.gt[45, 42, 0] == 1


def test_case_error_pickles_with_its_fields():
    error = pickle.loads(pickle.dumps(CaseError("/data/x.nii.gz", "broken", key="1/SA/ED")))
    assert (str(error.path), error.reason, error.key) == ("/data/x.nii.gz", "broken", "1/SA/ED")
    assert str(error) == "/data/x.nii.gz: broken"


def test_batch_with_one_bad_case_keeps_the_others(tmp_path, caplog):
    sources = [source(tmp_path, f"00{i}") for i in range(1, 5)]
    data = sources[2].gt_path.read_bytes()
    sources[2].gt_path.write_bytes(data[:200])
    with caplog.at_level(logging.WARNING, logger="qcloop.monitor.data"):
        report = load_cases(sources)
    assert [c.subject for c in report.cases] == ["001", "002", "004"]
    assert len(report.errors) == 1
    assert report.errors[0].path == sources[2].gt_path and report.errors[0].key == "003/SA/ED"
    assert "003/SA/ED" in caplog.text
    for case in report.cases:
        np.testing.assert_array_equal(case.gt, good_labels())
