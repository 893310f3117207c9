"""Layout discovery (M&Ms-2 nested and flat, M&Ms-1, ACDC), label mapping, metadata, writing label
maps back, and ``qcloop data summary``; every dataset is a handful of hand-made NIfTI files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli
from qcloop.monitor.data import (
    CaseError,
    discover,
    iter_cases,
    load_case,
    load_cases,
    save_label_map,
)

SPACING = (1.37, 1.37, 10.0)


def affine_for(spacing=SPACING, origin=(-40.0, 25.0, 7.5)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine_for() if affine is None else affine), path)
    return path


def marker_labels(shape=(64, 72, 3)) -> np.ndarray:
    """Labels 1, 2, 3 at distinct, known places (values as written in the file)."""
    gt = np.zeros(shape, np.uint8)
    gt[10:14, 10:14, :] = 1
    gt[30:36, 30:33, :] = 2
    gt[50:52, 60:70, :] = 3
    return gt


def image_like(gt: np.ndarray, offset: float = 0.0) -> np.ndarray:
    return (gt.astype(np.float32) * 100 + 50 + offset).astype(np.int16)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    lines = [",".join(header)] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- M&Ms-2


def make_mnms2(root: Path, flat: bool = False) -> None:
    for subject in ("001", "002", "205"):
        folder = root if flat else root / subject
        for phase in ("ED", "ES"):
            gt = marker_labels()
            write(folder / f"{subject}_SA_{phase}.nii.gz", image_like(gt))
            write(folder / f"{subject}_SA_{phase}_gt.nii.gz", gt)
            la = marker_labels((64, 72, 1))
            write(folder / f"{subject}_LA_{phase}.nii.gz", image_like(la))
            write(folder / f"{subject}_LA_{phase}_gt.nii.gz", la)
        cine = np.zeros((64, 72, 3, 4), np.int16)
        write(folder / f"{subject}_SA_CINE.nii.gz", cine)


def test_mnms2_nested_discovers_cases_and_ignores_cine(tmp_path):
    make_mnms2(tmp_path)
    write_csv(
        tmp_path / "dataset_information.csv",
        ["SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD"],
        [["1", "NOR", "SIEMENS", "Avanto", "1.5"], ["2", "HCM", "PHILIPS", "Achieva", "3.0"]],
    )
    sources = discover(tmp_path)
    keys = [s.key for s in sources]
    assert len(keys) == 12
    assert "001/SA/ED" in keys and "205/LA/ES" in keys
    assert not any("CINE" in str(s.image_path) for s in sources)
    first = sources[0]
    assert first.key == "001/LA/ED" and first.layout == "mnms2"
    assert first.gt_path == tmp_path / "001" / "001_LA_ED_gt.nii.gz"
    # CSV codes "1" match folder "001"; every column is kept, vendor/disease normalised.
    assert first.metadata["VENDOR"] == "SIEMENS" and first.vendor == "SIEMENS"
    assert first.metadata["FIELD"] == "1.5" and first.disease == "NOR"
    # Official split by subject number when the CSV has no SPLIT column.
    splits = {s.subject: s.split for s in sources}
    assert splits == {"001": "train", "002": "train", "205": "test"}
    assert all(s.frame is None for s in sources)


def test_mnms2_labels_are_kept_and_la_is_one_slice(tmp_path):
    make_mnms2(tmp_path)
    by_key = {s.key: s for s in discover(tmp_path)}
    sa = load_case(by_key["002/SA/ES"])
    assert sa.gt is not None and sa.gt.dtype == np.uint8 and sa.image.dtype == np.float32
    assert sa.gt[11, 11, 1] == 1 and sa.gt[31, 31, 0] == 2 and sa.gt[51, 65, 2] == 3
    assert sa.image[11, 11, 1] == pytest.approx(150.0)
    assert sa.spacing == pytest.approx(SPACING)
    np.testing.assert_allclose(sa.affine, affine_for())
    la = load_case(by_key["002/LA/ES"])
    assert la.shape == (64, 72, 1) and la.view == "LA"


def test_mnms2_flat_with_csv_in_parent_and_split_column(tmp_path):
    root = tmp_path / "dataset"
    make_mnms2(root, flat=True)
    write_csv(
        tmp_path / "dataset_information.csv",
        ["SUBJECT_CODE", "DISEASE", "VENDOR", "SPLIT", "SHIFT_KNOB"],
        [["1", "NOR", "A", "train", "none"], ["2", "DRV", "B", "test", "gamma"]],
    )
    sources = discover(root, layout="mnms2")
    assert len(sources) == 12
    assert all(s.image_path.parent == root for s in sources)
    two = [s for s in sources if s.subject == "002"]
    assert {s.split for s in two} == {"test"}
    assert two[0].metadata["SHIFT_KNOB"] == "gamma"


def test_filters_by_view_phase_and_metadata(tmp_path):
    make_mnms2(tmp_path)
    write_csv(
        tmp_path / "dataset_information.csv",
        ["SUBJECT_CODE", "VENDOR", "SPLIT"],
        [["1", "A", "train"], ["2", "B", "train"], ["205", "A", "test"]],
    )
    assert [s.key for s in discover(tmp_path, views=["sa"], phases=["ED"])] == [
        "001/SA/ED",
        "002/SA/ED",
        "205/SA/ED",
    ]
    assert {s.key for s in discover(tmp_path, views="LA", phases="ES")} == {
        "001/LA/ES",
        "002/LA/ES",
        "205/LA/ES",
    }
    vendor_a_train = discover(tmp_path, where={"VENDOR": "A", "SPLIT": "train"})
    assert {s.subject for s in vendor_a_train} == {"001"}
    assert len(vendor_a_train) == 4
    either = discover(tmp_path, where={"vendor": ("A", "B")}, views=["LA"])
    assert {s.subject for s in either} == {"001", "002", "205"}
    assert discover(tmp_path, where={"VENDOR": "Z"}) == []
    assert discover(tmp_path, where={"NO_SUCH_COLUMN": "A"}) == []


# ---------------------------------------------------------------- M&Ms-1

MNMS1_CSV = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
MNMS1_COLUMNS = ["External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Pathology"]


def make_mnms1_subject(folder: Path, code: str, ed: int, es: int, frames: int = 6) -> None:
    image = np.zeros((64, 72, 3, frames), np.int16)
    gt = np.zeros((64, 72, 3, frames), np.uint8)
    for t in range(frames):
        image[..., t] = 10 * t + 5
    gt[..., ed] = marker_labels()
    gt[20:24, 40:44, :, es] = 3
    write(folder / code / f"{code}_sa.nii.gz", image)
    write(folder / code / f"{code}_sa_gt.nii.gz", gt)


def test_mnms1_reads_ed_es_frames_from_the_csv(tmp_path):
    make_mnms1_subject(tmp_path / "Training" / "Labeled", "A0S9V9", ed=0, es=4)
    make_mnms1_subject(tmp_path / "Validation", "B2C3D4", ed=5, es=2)
    write_csv(
        tmp_path / MNMS1_CSV,
        MNMS1_COLUMNS,
        [
            ["A0S9V9", "Siemens", "A", "1", "0", "4", "NOR"],
            ["B2C3D4", "Philips", "B", "2", "5", "2", "HCM"],
        ],
    )
    sources = discover(tmp_path)
    assert [s.key for s in sources] == [
        "A0S9V9/SA/ED",
        "A0S9V9/SA/ES",
        "B2C3D4/SA/ED",
        "B2C3D4/SA/ES",
    ]
    assert {s.layout for s in sources} == {"mnms1"}
    assert [s.frame for s in sources] == [0, 4, 5, 2]
    assert sources[0].split == "train" and sources[2].split == "validation"
    assert sources[2].vendor == "B" and sources[2].metadata["VendorName"] == "Philips"
    assert sources[3].disease == "HCM"

    ed = load_case(sources[2])
    assert ed.shape == (64, 72, 3)
    assert np.all(ed.image == 55.0)  # frame 5
    np.testing.assert_array_equal(ed.gt, marker_labels())
    es = load_case(sources[3])
    assert np.all(es.image == 25.0)  # frame 2
    assert es.gt is not None and set(np.unique(es.gt)) == {0, 3}
    assert int((es.gt == 3).sum()) == 4 * 4 * 3


def test_mnms1_subject_missing_from_csv_is_skipped(tmp_path):
    make_mnms1_subject(tmp_path, "A0S9V9", ed=0, es=4)
    make_mnms1_subject(tmp_path, "ZZZ999", ed=0, es=4)
    write_csv(tmp_path / MNMS1_CSV, MNMS1_COLUMNS, [["A0S9V9", "Siemens", "A", "1", "0", "4", ""]])
    assert {s.subject for s in discover(tmp_path, layout="mnms1")} == {"A0S9V9"}


# ---------------------------------------------------------------- ACDC


def make_acdc_patient(root: Path, name: str, ed: int = 1, es: int = 12) -> None:
    folder = root / name
    for frame in (ed, es):
        gt = marker_labels()
        write(folder / f"{name}_frame{frame:02d}.nii.gz", image_like(gt))
        write(folder / f"{name}_frame{frame:02d}_gt.nii.gz", gt)
    write(folder / f"{name}_4d.nii.gz", np.zeros((64, 72, 3, 4), np.int16))
    (folder / "Info.cfg").write_text(
        f"ED: {ed}\nES: {es}\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n"
    )


def test_acdc_reverses_labels_and_reads_info_cfg(tmp_path):
    make_acdc_patient(tmp_path / "training", "patient001")
    sources = discover(tmp_path)
    assert [s.key for s in sources] == ["patient001/SA/ED", "patient001/SA/ES"]
    ed = sources[0]
    assert ed.layout == "acdc" and ed.disease == "DCM" and ed.split == "train"
    assert ed.metadata["NbFrame"] == "30" and ed.metadata["Weight"] == "95.0"
    case = load_case(ed)
    # ACDC 1 RV, 2 MYO, 3 LV  ->  qcloop 1 LV, 2 MYO, 3 RV
    assert case.gt[11, 11, 0] == 3  # file value 1 (RV)
    assert case.gt[31, 31, 0] == 2  # file value 2 (MYO)
    assert case.gt[51, 65, 0] == 1  # file value 3 (LV)
    assert int((case.gt == 0).sum()) == int((marker_labels() == 0).sum())


def test_acdc_frame_without_info_cfg_keeps_its_frame_name(tmp_path):
    make_acdc_patient(tmp_path, "patient007", ed=1, es=9)
    (tmp_path / "patient007" / "Info.cfg").unlink()
    assert [s.phase for s in discover(tmp_path, layout="acdc")] == ["frame01", "frame09"]
    assert discover(tmp_path, layout="acdc", phases=["ED"]) == []


# ---------------------------------------------------------------- discovery errors


def test_empty_or_missing_folder_raises_case_error_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(CaseError) as info:
        discover(tmp_path)
    assert str(tmp_path) in str(info.value) and "no cases" in str(info.value)
    with pytest.raises(CaseError, match="no acdc cases"):
        discover(tmp_path, layout="acdc")
    missing = tmp_path / "absent"
    with pytest.raises(CaseError, match="not found") as info:
        discover(missing)
    assert info.value.path == missing


def test_auto_refuses_a_folder_with_two_layouts(tmp_path):
    make_mnms2(tmp_path / "a")
    make_acdc_patient(tmp_path / "b", "patient001")
    with pytest.raises(CaseError, match="several layouts"):
        discover(tmp_path)
    assert len(discover(tmp_path, layout="acdc")) == 2


def test_unknown_layout_is_a_value_error(tmp_path):
    make_mnms2(tmp_path)
    with pytest.raises(ValueError, match="unknown layout"):
        discover(tmp_path, layout="kaggle")


# ---------------------------------------------------------------- writing label maps


def test_saved_label_map_keeps_affine_and_header(tmp_path):
    theta = np.deg2rad(20)
    rotation = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(SPACING)
    affine[:3, 3] = (-12.5, 80.25, -33.0)
    gt = marker_labels()
    nii = nib.Nifti1Image(image_like(gt), affine)
    nii.set_qform(affine, code=1)
    nii.header.set_xyzt_units("mm", "sec")
    nii.header["descrip"] = b"scanner X"
    (tmp_path / "001").mkdir()
    nib.save(nii, tmp_path / "001" / "001_SA_ED.nii.gz")
    case = load_case(discover(tmp_path)[0])

    prediction = np.flip(marker_labels(), axis=0).copy().astype(np.int64)
    out = save_label_map(tmp_path / "pred" / "001_SA_ED.nii.gz", prediction, case)
    assert sorted(p.name for p in out.parent.iterdir()) == ["001_SA_ED.nii.gz"]  # no temp file
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(back.dataobj), prediction)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_allclose(back.header.get_sform(), affine, atol=1e-5)
    np.testing.assert_allclose(back.header.get_qform(), affine, atol=1e-5)
    assert back.header.get_zooms() == pytest.approx(SPACING)
    assert back.header.get_xyzt_units() == ("mm", "sec")
    assert back.header["descrip"].tobytes().startswith(b"scanner X")
    slope, inter = back.header.get_slope_inter()
    assert slope in (None, 1.0) and inter in (None, 0.0)

    # Overwriting an existing file replaces it.
    save_label_map(out, np.zeros_like(prediction), case)
    assert not np.asarray(nib.load(out).dataobj).any()


def test_saved_label_map_of_a_4d_source_is_3d(tmp_path):
    make_mnms1_subject(tmp_path, "A0S9V9", ed=1, es=3)
    write_csv(tmp_path / MNMS1_CSV, MNMS1_COLUMNS, [["A0S9V9", "Canon", "D", "5", "1", "3", ""]])
    case = load_case(discover(tmp_path)[0])
    out = save_label_map(tmp_path / "ed.nii", case.gt, case)
    back = nib.load(out)
    assert back.shape == (64, 72, 3)
    np.testing.assert_array_equal(np.asarray(back.dataobj), marker_labels())


def test_save_label_map_refuses_a_wrong_shape(tmp_path):
    make_mnms2(tmp_path)
    case = load_case(discover(tmp_path)[0])
    with pytest.raises(ValueError, match="do not match"):
        save_label_map(tmp_path / "x.nii.gz", np.zeros((3, 3, 3), np.uint8), case)


# ---------------------------------------------------------------- batch loading and the CLI


def test_iter_cases_records_errors_and_keeps_good_cases(tmp_path):
    make_mnms2(tmp_path)
    bad = tmp_path / "002" / "002_SA_ES_gt.nii.gz"
    write(bad, np.full((64, 72, 3), 7, np.uint8))
    errors: list[CaseError] = []
    keys = [c.key for c in iter_cases(discover(tmp_path), errors)]
    assert len(keys) == 11 and "002/SA/ES" not in keys
    assert [e.key for e in errors] == ["002/SA/ES"]
    report = load_cases(discover(tmp_path))
    assert len(report.cases) == 11 and len(report.errors) == 1


def test_cli_summary_counts_labels_and_bad_cases(tmp_path):
    make_mnms2(tmp_path)
    write_csv(
        tmp_path / "dataset_information.csv",
        ["SUBJECT_CODE", "DISEASE", "VENDOR"],
        [["1", "NOR", "A"], ["2", "NOR", "B"], ["205", "HCM", "A"]],
    )
    (tmp_path / "205" / "205_LA_ES.nii.gz").write_bytes(b"not a nifti file")
    result = CliRunner().invoke(cli, ["data", "summary", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["discovered"] == 12 and report["loaded"] == 11 and report["failed"] == 1
    assert report["counts"]["view"] == {"LA": 5, "SA": 6}
    assert report["counts"]["vendor"] == {"A": 7, "B": 4}
    assert report["counts"]["disease"] == {"HCM": 3, "NOR": 8}
    assert report["shape"] == {"min": [64, 72, 1], "max": [64, 72, 3]}
    sa_ed = report["label_volumes"]["SA/ED"]
    markers = marker_labels()
    voxel_ml = float(np.prod(SPACING)) / 1000
    for name, label in (("LV", 1), ("MYO", 2), ("RV", 3)):
        assert sa_ed[name]["voxels"] == 3 * int((markers == label).sum())
        assert sa_ed[name]["mean_ml"] == pytest.approx(
            (markers == label).sum() * voxel_ml, abs=0.01
        )
    assert report["bad_cases"][0]["key"] == "205/LA/ES"
    assert "not a readable NIfTI" in report["bad_cases"][0]["reason"]

    text = CliRunner().invoke(cli, ["data", "summary", str(tmp_path)])
    assert text.exit_code == 0
    assert "11 loaded, 1 failed" in text.output and "205/LA/ES" in text.output


def test_cli_summary_fails_when_nothing_loads(tmp_path):
    (tmp_path / "001").mkdir()
    (tmp_path / "001" / "001_SA_ED.nii.gz").write_bytes(b"\x1f\x8b broken")
    result = CliRunner().invoke(cli, ["data", "summary", str(tmp_path)])
    assert result.exit_code == 1
    assert "0 loaded, 1 failed" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["data", "summary", str(empty)])
    assert result.exit_code != 0 and "no cases" in result.output
