"""``qcloop bench loop``: every section measured on the tiny run, its JSON compared with a later
run's, and the pieces that turn timings into figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcloop.monitor.benchmarks.loop import compare_figures, flat, linearity, write_repeated_list
from qcloop.monitor.benchmarks.loop_state import write_ledger
from qcloop.monitor.cli.main import cli
from qcloop.monitor.ops.ledger import Ledger


@pytest.mark.slow
def test_bench_loop_measures_every_section_and_compares(tiny_run, tiny_cohort, tmp_path) -> None:
    args = ["bench", "loop", "--run", str(tiny_run), "--data", str(tiny_cohort),
            "--stage-cases", "2", "--sizes", "3,6", "--engines", "local",
            "--ledger-lines", "300", "--windows", "1"]  # fmt: skip
    first = CliRunner().invoke(cli, [*args, "--json", str(tmp_path / "a.json")])
    assert first.exit_code == 0, first.output
    figures = json.loads((tmp_path / "a.json").read_text())
    stages = figures["stages"]["SA"]
    assert set(stages["median_ms"]) == {
        "read", "preprocess", "segment", "reconstruct", "pseudo_metrics", "select", "estimate",
        "restore_write",
    }  # fmt: skip
    assert all(v > 0 for v in stages["median_ms"].values())
    assert stages["qc_over_segmentation"] > 0
    assert 0 < stages["estimate_over_scoring"] < 1 and stages["estimator"] is False
    assert "estimate (signals (run has no estimator)) / scoring of the case" in first.output
    rows = figures["throughput"]["rows"]
    assert [(r["engine"], r["size"], r["cases"]) for r in rows] == [
        ("local", 3, 3),
        ("local", 6, 6),
    ]
    assert all(r["cases_per_s"] > 0 and r["peak_rss_mib"] > 50 for r in rows)
    assert figures["ledger_restart"]["entries"] == 300
    (refined,) = figures["refinement"]["rows"]
    assert refined["window"] == 1 and refined["candidate_epochs"] >= 1
    assert "QC / segmentation of one candidate" in first.output
    assert first.output.startswith("$ qcloop bench loop --run")
    again = CliRunner().invoke(cli, [*args, "--compare", str(tmp_path / "a.json")])
    assert again.exit_code == 0, again.output
    assert "change against" in again.output
    assert "throughput.rows[local@6].cases_per_s" in again.output


def test_bad_engine_names_are_refused(tiny_run, tiny_cohort) -> None:
    r = CliRunner().invoke(cli, ["bench", "loop", "--run", str(tiny_run), "--data",
                                 str(tiny_cohort), "--engines", "local,spark"])  # fmt: skip
    assert r.exit_code == 2 and "spark: use local or rayN" in r.output


def test_compare_reports_the_change_of_every_shared_number() -> None:
    before = {"a": {"x": 2.0, "rows": [{"engine": "local", "size": 10, "cases_per_s": 4.0}]}}
    after = {"a": {"x": 3.0, "y": 1, "rows": [{"engine": "local", "size": 10, "cases_per_s": 2.0}]}}
    rows = {k: (old, new, pct) for k, old, new, pct in compare_figures(before, after)}
    assert rows["a.x"] == (2.0, 3.0, 50.0)
    assert rows["a.rows[local@10].cases_per_s"] == (4.0, 2.0, -50.0)
    assert "a.y" not in rows  # not in the earlier run
    assert "load_before" not in flat({"load_before": [1.0], "z": True})


def test_linearity_separates_start_up_from_the_cost_per_case() -> None:
    rows = [
        {"engine": "ray1", "size": 100, "cases": 100, "seconds": 15.0, "ms_per_case": 150.0,
         "peak_rss_mib": 400.0},
        {"engine": "ray1", "size": 1000, "cases": 1000, "seconds": 60.0, "ms_per_case": 60.0,
         "peak_rss_mib": 402.0},
    ]  # fmt: skip
    lin = linearity(rows)["ray1"]
    assert lin["marginal_ms_per_case"] == 50.0  # (60 - 15) s over 900 more cases
    assert lin["ms_per_case_ratio"] == 0.4 and lin["peak_rss_growth_mib"] == 2.0


def test_synthetic_ledger_reopens_as_a_monitors(tmp_path: Path) -> None:
    write_ledger(tmp_path, 2500)
    ledger = Ledger(tmp_path)
    assert len(ledger.done) == 2500 and ledger.seq == 2500
    # a window reset every 1,000 cases: the SA window holds the SA cases since the last one
    assert len(ledger.history("SA", "1").cases) == 250


def test_repeated_lists_give_each_copy_a_subject_of_its_own(tiny_cohort, tmp_path) -> None:
    from qcloop.monitor.data.case_list import read_case_list

    cases = read_case_list(write_repeated_list(str(tiny_cohort), "LA", 100, tmp_path / "c.csv"))
    assert len(cases) == 100 and len({c.key for c in cases}) == 100
