"""Where batch cases come from: a dataset folder, a glob inside one, a CSV or Parquet case list;
and the clear errors of a bad list."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli
from qcloop.monitor.data import CaseError, discover
from qcloop.monitor.data.case_list import find_cases, read_case_list


def write_list(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_a_csv_list_names_the_same_cases_as_the_folder(tiny_cohort: Path, tmp_path: Path) -> None:
    rows = [
        {
            "image": str(s.image_path),
            "view": s.view,
            "phase": s.phase,
            "subject": s.subject,
            "gt": str(s.gt_path),
            "VENDOR": s.vendor,
        }
        for s in discover(tiny_cohort, views="SA")
    ]
    listed_cases = read_case_list(write_list(tmp_path / "cases.csv", rows))
    found = discover(tiny_cohort, views="SA")
    assert [(s.key, s.image_path, s.gt_path) for s in listed_cases] == [
        (s.key, s.image_path, s.gt_path) for s in found
    ]
    assert listed_cases[0].vendor == found[0].vendor  # metadata columns kept (as VENDOR)
    b_only = find_cases(tmp_path / "cases.csv", where={"VENDOR": "B"})
    assert b_only and all(s.vendor == "B" for s in b_only)


def test_relative_paths_default_phase_and_subject(tiny_cohort: Path, tmp_path: Path) -> None:
    src = discover(tiny_cohort, views="LA")[0]
    image = tmp_path / "img" / src.image_path.name
    image.parent.mkdir()
    image.write_bytes(src.image_path.read_bytes())
    (case,) = read_case_list(
        write_list(tmp_path / "c.csv", [{"image": "img/" + image.name, "view": "la"}])
    )
    assert case.image_path == image and case.view == "LA" and case.phase == "ED"
    assert case.subject == image.name.split(".nii")[0] and case.gt_path is None


def test_parquet_lists_and_globs(tiny_cohort: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    found = discover(tiny_cohort, views="SA", phases="ES")
    table = pa.table(
        {
            "image": [str(s.image_path) for s in found],
            "view": ["SA"] * len(found),
            "phase": ["ES"] * len(found),
            "subject": [s.subject for s in found],
            "gt": [str(s.gt_path) for s in found],
        }
    )
    pq.write_table(table, tmp_path / "cases.parquet")
    assert [s.key for s in find_cases(tmp_path / "cases.parquet")] == [s.key for s in found]
    globbed = find_cases(f"{tiny_cohort}/*/*_SA_ES.nii.gz")
    assert [s.key for s in globbed] == [s.key for s in found]
    assert globbed[0].metadata == found[0].metadata  # the layout's metadata, not just files


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"image": "a.nii.gz", "phase": "ED"}], "no column view"),
        ([{"image": "missing.nii.gz", "view": "SA"}], "row 2: image 'missing.nii.gz' not found"),
        ([{"image": "", "view": "SA"}], "row 2: image is empty"),
        ([{"image": "IMG", "view": "AX"}], "row 2: view must be SA or LA"),
        ([{"image": "IMG", "view": "SA", "frame": "x"}], "frame must be a 0-based index"),
        ([{"image": "IMG", "view": "SA"}, {"image": "IMG", "view": "SA"}], "listed more than once"),
    ],
)
def test_a_bad_list_names_the_file_row_and_problem(
    tiny_cohort: Path, tmp_path: Path, rows: list[dict[str, str]], message: str
) -> None:
    image = str(discover(tiny_cohort)[0].image_path)
    rows = [{k: v.replace("IMG", image) for k, v in r.items()} for r in rows]
    path = write_list(tmp_path / "bad.csv", rows)
    with pytest.raises(CaseError, match=message) as err:
        read_case_list(path)
    assert err.value.path == path


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(CaseError, match="case list not found"):
        find_cases(tmp_path / "nope.csv")
    with pytest.raises(CaseError, match="the glob matches no file"):
        find_cases(f"{tmp_path}/*.nii.gz")
    with pytest.raises(CaseError, match="not a dataset folder"):
        find_cases(tmp_path / "file.txt")


def test_assess_takes_a_case_list(tiny_cohort: Path, tiny_run: Path, tmp_path: Path) -> None:
    src = [s for s in discover(tiny_cohort, views="SA") if s.subject in ("001", "002")]
    path = write_list(
        tmp_path / "cases.csv",
        [
            {
                "image": str(s.image_path),
                "view": "SA",
                "phase": s.phase,
                "subject": s.subject,
                "gt": str(s.gt_path),
            }
            for s in src
        ],
    )
    out = tmp_path / "out"
    r = CliRunner().invoke(
        cli, ["assess", "--data", str(path), "--run", str(tiny_run), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [(x["subject"], x["phase"]) for x in records] == [(s.subject, s.phase) for s in src]
    assert all("true_selected" in x for x in records)  # ground truth from the gt column
    r = CliRunner().invoke(
        cli,
        ["assess", "--data", str(tmp_path / "x.csv"), "--run", str(tiny_run), "--out", str(out)],
    )
    assert r.exit_code == 1 and "x.csv: case list not found" in r.output
