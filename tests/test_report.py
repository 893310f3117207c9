"""qcloop report: what it reads from each kind of folder, what it refuses, and that the page
is self-contained (its plots inline, its case links relative, nothing from the network)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcloop.monitor.benchmarks.report import synthetic_output
from qcloop.monitor.cli.main import cli
from qcloop.monitor.report.page import CASE_COLUMNS, build_report, write_report
from qcloop.monitor.report.sources import ReportError, read_source


def _case_data(page: str) -> list[list]:
    match = re.search(r'<script type="application/json" id="case-data">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def test_an_assess_output_reads_as_rows_with_truth_fences_figures(tmp_path: Path) -> None:
    folder = synthetic_output(tmp_path / "out", 40)
    source = read_source(folder)
    assert source.kind == "assess" and len(source.rows) == 40
    row = source.rows[0]
    assert {"pdc", "phd_mm", "true_dice", "fences", "ood", "vendor"} <= set(row)
    flagged = [r for r in source.rows if r["ood"]]
    assert flagged and all(Path(r["figure"]).is_file() for r in flagged)


def test_a_monitor_folder_keeps_its_ledger_events_in_case_order(tmp_path: Path) -> None:
    folder = synthetic_output(tmp_path / "mon", 10, monitor=True)
    source = read_source(folder)
    assert source.kind == "monitor" and [r["seq"] for r in source.rows] == list(range(1, 11))
    kinds = [(e["event"], e["after_seq"]) for e in source.events]
    assert kinds == [("alert", 6), ("refinement", 6), ("alert", 6), ("refinement", 6)]
    page = build_report(folder, folder / "report.html")
    assert 'id="plot-monitor-timeline"' in page and "2 alert, 2 refinement" in page


def test_empty_half_written_and_foreign_folders_say_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="not a folder"):
        read_source(tmp_path / "nothing")
    with pytest.raises(ReportError, match="not a qcloop output"):
        read_source(tmp_path)
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ReportError, match=r"records\.jsonl missing"):
        read_source(tmp_path)
    (tmp_path / "records.jsonl").write_text("")
    with pytest.raises(ReportError, match="no case has been scored yet"):
        read_source(tmp_path)
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "ablation.json").write_text("{}")
    with pytest.raises(ReportError, match=r"evaluations\.jsonl missing"):
        read_source(demo)
    # a monitor killed mid-append: the torn last line is left out and said so
    folder = synthetic_output(tmp_path / "torn", 6, monitor=True)
    with open(folder / "records.jsonl", "a") as fh:
        fh.write('{"subject": "07", "vie')
    source = read_source(folder)
    assert len(source.rows) == 6 and source.warnings == [
        "records.jsonl:7: not a JSON line (left out)"
    ]
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "not a folder" in result.output


def test_the_page_is_self_contained_and_links_case_files_relatively(tmp_path: Path) -> None:
    folder = synthetic_output(tmp_path / "out", 30)
    records = [json.loads(x) for x in (folder / "records.jsonl").read_text().splitlines()]
    records[0]["subject"] = "</script><script>alert(1)</script>"  # an id must stay text
    records[1]["estimate"] = {"structures": {"RV": {"dice": 0.625, "source": "calibrated"}}}
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "pages" / "report.html"
    info = write_report(folder, out)
    page = out.read_text()
    assert info["bytes"] == len(page.encode()) and not list(out.parent.glob(".*"))
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing from the network
    assert page.count("alert(1)") == 1 and "<script>alert(1)" not in page
    for name in ("pdc-vs-dice", "roc", "distributions", "flagged-by-vendor"):
        assert re.search(rf'id="plot-{name}"><img alt="{name}" src="data:image/png;base64,', page)
    rows = _case_data(page)
    assert len(rows) == 30 and len(rows[0]) == len(CASE_COLUMNS)
    assert rows[0][0].startswith("</script>")
    est = CASE_COLUMNS.index("est Dice")
    assert rows[1][est] == 0.625 and rows[0][est] is None  # a run without an estimator: empty
    figure_col, mask_col = CASE_COLUMNS.index("figure"), CASE_COLUMNS.index("mask")
    for row in rows:
        assert (out.parent / row[mask_col]).resolve().is_file()  # ../out/masks/...
        assert row[figure_col] is None or (out.parent / row[figure_col]).resolve().is_file()


def test_bench_report_prints_size_and_time_per_case_count(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["bench", "report", "--cases", "20", "--cases", "60", "--json"]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert [f["cases"] for f in figures] == [20, 60]
    assert all(f["bytes"] > 0 and f["seconds"] >= 0 for f in figures)
    assert figures[1]["bytes"] > figures[0]["bytes"]
