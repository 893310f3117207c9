"""The drift policy on the calibrated estimate (``monitoring.drift_score: est``): the window's
median est_dice against an absolute floor, carried through the ledger across a restart, and
refused for a model that has no estimator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcloop.monitor import WindowStats
from qcloop.monitor.cli.main import cli
from qcloop.monitor.method.run_folder import RunError
from qcloop.monitor.ops.drift import DriftLimits, RollingWindow, decision_est, judge_drift
from qcloop.monitor.ops.ledger import JsonlLog, WindowCase, case_entry
from qcloop.monitor.ops.monitor import Monitor
from tests.monitor_support import champions_of, exporter_samples, feed_inbox, monitor_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def record(est: dict[str, float] | None, structure: str = "RV") -> dict:
    rec = {"decision_structure": structure, "ood": False,
           "candidates": [{"LV": {"pdc": 0.9}, "MYO": {"pdc": 0.8}, "RV": {"pdc": 0.4}}]}  # fmt: skip
    if est is not None:
        rec["estimate"] = {"structures": {s: {"dice": v} for s, v in est.items()}}
    return rec


def test_decision_est_reads_the_decision_structure_or_nothing() -> None:
    assert decision_est(record({"LV": 0.9, "MYO": 0.7, "RV": 0.6})) == 0.6
    assert decision_est(record({"LV": 0.9, "MYO": 0.7, "RV": 0.5}, "mean")) == pytest.approx(0.7)
    assert decision_est(record(None)) is None
    assert decision_est(record({"LV": 0.9}, "RV")) is None  # not the decision structure
    assert decision_est(record({"LV": 0.9, "RV": 0.5}, "mean")) is None  # MYO missing
    assert decision_est(record({"RV": float("nan")})) is None


def test_the_window_keeps_both_medians_and_the_rule_picks_one() -> None:
    window = RollingWindow(4)
    for est in (0.9, None, 0.7, 0.6, 0.65):  # the first drops out
        window.add(False, 0.5, est=est)
    stats = window.stats()
    assert stats.median_pdc == 0.5 and stats.median_est == 0.65  # None is not a 0
    assert stats.to_dict()["median_est"] == 0.65
    assert "median_est" not in RollingWindow(2).stats().to_dict()
    with pytest.raises(ValueError, match="non-finite est_dice"):
        window.add(False, 0.5, est=float("inf"))

    pdc_rule = DriftLimits(min_cases=4, median_pdc_shift_limit=0.1)
    est_rule = DriftLimits(min_cases=4, score="est", min_median_est_dice=0.8)
    low_pdc_good_est = WindowStats(10, 0.0, 0.5, 0.85)
    assert judge_drift(low_pdc_good_est, 0.9, pdc_rule).alert  # pDC fell 0.4 below reference
    assert not judge_drift(low_pdc_good_est, 0.9, est_rule).alert  # the estimate says fine
    d = judge_drift(WindowStats(10, 0.0, 0.95, 0.7), 0.9, est_rule)
    assert d.alert and d.reasons == ("median est Dice 0.700 < floor 0.800",)
    assert not judge_drift(WindowStats(10, 0.0, 0.95, None), 0.9, est_rule).alert
    assert not judge_drift(WindowStats(3, 0.0, 0.95, 0.1), 0.9, est_rule).alert  # too few


def test_ledger_entries_carry_the_estimate_and_old_ones_read_as_none() -> None:
    rec = {**record({"RV": 0.61}), "sha256": "x", "seq": 3, "case_id": "c", "view": "SA",
           "source_file": "c.nii.gz", "processed": "p", "mask": "m"}  # fmt: skip
    entry = case_entry(rec)
    assert entry["decision_est"] == 0.61 and WindowCase.from_entry(entry).est == 0.61
    old = {k: v for k, v in entry.items() if k != "decision_est"}
    assert WindowCase.from_entry(old).est is None


@pytest.fixture(scope="module")
def run_with_estimator(run_copy: Path, tiny_cohort: Path, tmp_path_factory) -> Path:
    """The tiny run with an estimator fitted on its own cohort (too few failures for a
    calibrator: every structure falls back to pDC, which is still an ``estimate``)."""
    from tests.test_predictions import subset

    root = tmp_path_factory.mktemp("est")
    run = root / "run"
    shutil.copytree(run_copy, run)
    data = subset(tiny_cohort, root / "data")  # four subjects: seconds, and a fallback all the same
    result = CliRunner().invoke(cli, ["fit-estimator", "--run", str(run), "--data",
                                      str(data), "--view", "SA"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (run / "SA" / "estimator.json").is_file()
    return run


@pytest.mark.slow
def test_the_monitor_alerts_on_the_estimate_and_restores_it(
    run_with_estimator: Path, tiny_cohort: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    fed = feed_inbox(inbox, tiny_cohort, "SA", {"A", "B", "C"}, 4)
    cfg = monitor_cfg(
        run_with_estimator, drift_score="est", min_median_est_dice=0.999, min_cases=3,
        drift_rule="fixed", ood_fraction_limit=1.0,
    )  # fmt: skip
    champs = champions_of(run_with_estimator, ("SA",))
    mon = Monitor(inbox, out, cfg, champs, settle_s=0)
    assert mon.step() == len(fed)
    ledger = list(JsonlLog(out / "ledger.jsonl").read())
    cases = [e for e in ledger if e["event"] == "case"]
    assert all(0 <= e["decision_est"] <= 1 for e in cases)
    (alert,) = [e for e in ledger if e["event"] == "alert"]
    assert any(r.startswith("median est Dice") for r in alert["alert"]["reasons"])
    assert not any(r.startswith("median pDC") for r in alert["alert"]["reasons"])
    median = mon.windows.stats("SA").median_est
    assert exporter_samples(mon)[("qcloop_est_dice_window_median", (("view", "SA"),))] == median
    mon.close()
    again = Monitor(inbox, out, cfg, champs, settle_s=0)  # a restart rebuilds the window
    assert again.windows.stats("SA").median_est == median
    again.close()


def test_watching_the_estimate_needs_an_estimator(
    run_copy: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    cfg = monitor_cfg(run_copy, drift_score="est")
    with pytest.raises(RunError, match=r"no calibrated estimate \(SA/estimator.json\)"):
        Monitor(tmp_path / "inbox", tmp_path / "out", cfg, champions_of(run_copy, ("SA",)))
    assert json.loads(json.dumps(cfg.monitoring.model_dump()))["drift_score"] == "est"


# --------------------------------------------------------------------------- flagging on est


def test_an_estimator_that_flags_keeps_the_fences_verdict_beside_its_own() -> None:
    from qcloop.monitor.method.quality_estimate import Estimator

    est = Estimator("isotonic", {}, {}, level=0.9, failure_dice=0.8)
    est.estimate = lambda rec: rec["_est"]  # type: ignore[method-assign]
    judged = {**record(None), "ood": False, "_est": {"structures": {"RV": {"dice": 0.5}}}}
    est.apply(judged)  # no floor: the fences decide
    assert judged["ood"] is False and "ood_fences" not in judged
    est.flag_below = 0.8
    est.apply(judged)
    assert judged["ood"] is True and judged["ood_fences"] is False
    unjudged = {**record(None), "ood": None, "_est": {"structures": {"RV": {"dice": 0.5}}}}
    est.apply(unjudged)  # calibration scores without a verdict: nothing to flag
    assert unjudged["ood"] is None and "ood_fences" not in unjudged
    no_rv = {**record(None), "ood": True, "_est": {"structures": {"LV": {"dice": 0.1}}}}
    est.apply(no_rv)  # no estimate of the decision structure: the fences' verdict stands
    assert no_rv["ood"] is True and "ood_fences" not in no_rv


def _flag_on_est(run: Path, dst: Path, floor: float) -> Path:
    from qcloop.monitor.core.config import load_config, save_config

    shutil.copytree(run, dst)
    cfg = load_config(dst / "config.yaml")
    update = {"flag_on": "est", "est_flag_dice": floor}
    save_config(cfg.model_copy(update={"assessment": cfg.assessment.model_copy(update=update)}),
                dst / "config.yaml")  # fmt: skip
    return dst


@pytest.mark.slow
def test_flag_on_est_flags_by_the_estimate_offline_and_online(
    run_with_estimator: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    from qcloop.monitor.data import discover, load_case
    from qcloop.monitor.ops.scoring import load_online_scorers
    from tests.test_predictions import subset

    data = subset(tiny_cohort, tmp_path / "data")
    for floor, flagged in ((1.0, True), (0.0, False)):  # every case below / none below
        run = _flag_on_est(run_with_estimator, tmp_path / f"run-{floor}", floor)
        out = tmp_path / f"a-{floor}"
        result = CliRunner().invoke(cli, ["assess", "--run", str(run), "--data", str(data),
                                          "--out", str(out), "--view", "SA"])  # fmt: skip
        assert result.exit_code == 0, result.output
        recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        assert recs and all(r["ood"] is flagged and "ood_fences" in r for r in recs)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["views"]["SA"]["ood"] == (len(recs) if flagged else 0)
        scorer = load_online_scorers(run, ["SA"], runtime="torch")["SA"]
        online = scorer.score(load_case(next(s for s in discover(data) if s.view == "SA")))
        assert online.record["ood"] is flagged and online.ood is flagged


def test_flag_on_est_needs_an_estimator(run_copy: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    from tests.test_predictions import subset

    run = _flag_on_est(run_copy, tmp_path / "run", 0.8)
    data = subset(tiny_cohort, tmp_path / "data")
    result = CliRunner().invoke(cli, ["assess", "--run", str(run), "--data", str(data),
                                      "--out", str(tmp_path / "a"), "--view", "SA"])  # fmt: skip
    assert result.exit_code != 0
    assert "estimator.json: missing; assessment.flag_on is est" in result.output
    # fitting the estimator such a run asks for is not refused for the same reason
    result = CliRunner().invoke(cli, ["fit-estimator", "--run", str(run), "--data",
                                      str(data), "--view", "SA"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (run / "SA" / "estimator.json").is_file()
