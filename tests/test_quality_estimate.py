"""The calibrated quality estimate (est_dice, est_hd_mm): calibrators, conformal intervals,
fallbacks, clipping, the plugin contract, and fit-estimator / evaluate-qc end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from qcloop.monitor import hookimpl
from qcloop.monitor.cli.main import cli
from qcloop.monitor.method.qc_evaluation import qc_rows, spearman
from qcloop.monitor.method.quality_estimate import (
    MIN_CASES,
    estimator_from_dict,
    fit_estimator,
    load_estimator,
    record_features,
    save_estimator,
)
from qcloop.plugins.calibrators import IsotonicCalibrator, LinearCalibrator
from tests.helpers import biased_records as biased
from tests.helpers import qc_record as record

CALIBRATORS = {"isotonic": IsotonicCalibrator, "linear": LinearCalibrator}


def test_isotonic_is_monotone_and_flat_beyond_its_points() -> None:
    cal = IsotonicCalibrator()
    x = np.array([[0.1], [0.2], [0.3], [0.4], [0.4]])
    cal.fit(x, np.array([0.3, 0.2, 0.5, 0.6, 0.8]))
    grid = np.linspace(-1, 2, 50)[:, None]
    pred = cal.predict(grid)
    assert np.all(np.diff(pred) >= 0)
    assert pred[0] == pytest.approx(0.25) and pred[-1] == pytest.approx(0.7)  # ties averaged
    # the pooled block (0.1, 0.2) is one knot at x 0.15: strictly rising between knots, so
    # cases inside the fitted range keep their order (pDC's ranking, Spearman r, AUROC)
    assert cal.to_dict() == {
        "x": pytest.approx([0.15, 0.3, 0.4]),
        "y": pytest.approx([0.25, 0.5, 0.7]),
    }
    inside = cal.predict(np.array([[0.16], [0.2], [0.25], [0.35]]))
    assert np.all(np.diff(inside) > 0) and inside[1] == pytest.approx(0.25 + 0.25 / 3)


def test_linear_recovers_a_linear_map() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = 0.5 + x @ np.array([0.2, -0.1, 0.0])
    cal = LinearCalibrator(alpha=0.0)
    cal.fit(x, y)
    assert np.allclose(cal.predict(x), y)
    again = LinearCalibrator()
    again.load_dict(cal.to_dict())
    assert np.allclose(again.predict(x), y)


@pytest.mark.parametrize("name", ["isotonic", "linear"])
def test_the_estimate_corrects_the_bias_and_its_interval_covers(name: str) -> None:
    est = fit_estimator(biased(300, 0), CALIBRATORS, name, level=0.9)
    assert not est.warnings
    fresh = biased(400, 1)
    rows = [r for r in qc_rows([{**r, "estimate": est.estimate(r)} for r in fresh])
            if r["vendor"] == "all" and r["structure"] == "RV"]  # fmt: skip
    row = rows[0]
    assert row["pdc_mae"] > 0.09 and row["est_mae"] < 0.04
    assert 0.85 <= row["est_coverage"] <= 0.95  # nominal 0.9
    assert row["est_accuracy"] > row["pdc_accuracy"]


def test_too_few_cases_or_no_failures_fall_back_to_pdc() -> None:
    few = fit_estimator(biased(MIN_CASES - 1, 0), CALIBRATORS)
    assert len(few.warnings) == 3 and f"fewer than {MIN_CASES}" in few.warnings[0]
    good = [record(0.9, 0.95) for _ in range(40)]
    none_failed = fit_estimator(good, CALIBRATORS)
    assert "0 failure(s) (true Dice < 0.8) among 40" in none_failed.warnings[0]
    out = none_failed.estimate(record(1.2, None))["structures"]["RV"]
    assert out == {"dice": 1.0, "dice_lo": None, "dice_hi": None, "hd_mm": 0.0,
                   "hd_lo_mm": None, "hd_hi_mm": None, "source": "pdc"}  # fmt: skip
    assert none_failed.to_dict()["warnings"] == none_failed.warnings  # recorded in the run


class _Wild:
    """A third-party calibrator that misbehaves: NaN for low signals, 1.5 for high ones."""

    def fit(self, features: np.ndarray, target: np.ndarray) -> None:
        pass

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.where(features[:, 0] < 0.5, np.nan, 1.5)

    def to_dict(self) -> dict:
        return {}

    def load_dict(self, data: dict) -> None:
        pass


def test_an_estimate_is_always_clipped_and_finite() -> None:
    est = fit_estimator(biased(60, 0), {"wild": _Wild}, "wild")
    high = est.estimate(record(0.9, None))["structures"]["RV"]
    assert high["dice"] == 1.0 and high["source"] == "calibrated"
    assert 0.0 <= high["dice_lo"] <= high["dice_hi"] == 1.0
    low = est.estimate(record(0.3, None))["structures"]["RV"]
    assert low["dice"] == 0.3 and low["source"] == "pdc"
    assert all(math.isfinite(v) for v in (high["hd_mm"], low["hd_mm"]))


def test_masks_without_probabilities_use_the_isotonic_but_not_the_linear_calibrator() -> None:
    recs = biased(60, 0)
    for r in recs:
        r.pop("signals")
    assert not fit_estimator(recs, CALIBRATORS, "isotonic").warnings
    assert math.isnan(record_features(recs[0], "RV")["entropy"])
    linear = fit_estimator(recs, CALIBRATORS, "linear")
    assert "lack a signal" in linear.warnings[0]


def test_the_estimator_file_round_trips_and_a_bad_one_names_itself(tmp_path: Path) -> None:
    est = fit_estimator(biased(80, 0), CALIBRATORS, "linear")
    (tmp_path / "SA").mkdir()
    save_estimator(tmp_path / "SA", est)
    back = load_estimator(tmp_path, "SA")
    r = record(0.6, None)
    assert back is not None and back.estimate(r) == est.estimate(r)
    assert estimator_from_dict(est.to_dict(), CALIBRATORS).estimate(r) == est.estimate(r)
    (tmp_path / "SA" / "estimator.json").write_text('{"calibrator": "linear"}')
    with pytest.raises(ValueError, match=r"estimator\.json: not an estimator file"):
        load_estimator(tmp_path, "SA")
    assert load_estimator(tmp_path, "LA") is None


def test_a_third_party_calibrator_replaces_the_built_in(monkeypatch) -> None:
    from qcloop.monitor.core.plugin_manager import (
        BLOCK_PLUGINS_ENV,
        get_plugin_manager,
        reset_plugin_manager,
    )

    class Plugin:
        @hookimpl
        def register_calibrators(self, register: Any) -> None:
            register("isotonic", _Wild)

    monkeypatch.setenv(BLOCK_PLUGINS_ENV, "qcloop.plugins.calibrators")
    reset_plugin_manager()  # the conftest resets it again after the test
    pm = get_plugin_manager()
    pm.register(Plugin(), name="my-calibrators")
    registry = pm.calibrators()
    assert registry["isotonic"].factory is _Wild and "linear" not in registry
    est = fit_estimator(biased(60, 0), registry)
    assert est.estimate(record(0.9, None))["structures"]["RV"]["dice"] == 1.0


def test_spearman_handles_ties_and_constants() -> None:
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_fit_estimator_and_evaluate_qc_end_to_end(tiny_run, tiny_cohort, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    args = ["fit-estimator", "--run", str(run), "--data", str(tiny_cohort), "--view", "SA"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "SA" / "estimator.json").read_text())
    assert saved["fitted_on"]["cases"] == 36 and set(saved["structures"]) == {"LV", "MYO", "RV"}
    assert (
        f"SA RV: 36 cases, {saved['structures']['RV']['dice']['failures']} failures"
        in result.output
    )
    js = tmp_path / "qc.json"
    args = ["evaluate-qc", "--run", str(run), "--data", str(tiny_cohort), "--view", "SA",
            "--where", "SPLIT=test", "--json", str(js), "--records", str(tmp_path / "rec")]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "| vendor | view | structure | n | fail | est ρ | pDC ρ |" in result.output
    rows = json.loads(js.read_text())["rows"]
    assert {r["vendor"] for r in rows} == {"A", "B", "C", "all"}
    assert [r["n"] for r in rows if r["vendor"] == "all"] == [24, 24, 24]
    records = [json.loads(x) for x in (tmp_path / "rec" / "records.jsonl").read_text().splitlines()]
    for rec in records:
        for e in rec["estimate"]["structures"].values():
            assert 0 <= e["dice"] <= 1 and (e["source"] == "pdc" or e["dice_lo"] <= e["dice"])
        assert len(rec["signals"]["entropy"]) == len(rec["candidates"])
    # masks made elsewhere (here the ground truth itself) get the run's estimate too
    args = ["evaluate-qc", "--run", str(run), "--data", str(tiny_cohort), "--view", "SA",
            "--where", "SPLIT=test", "--predictions", str(tiny_cohort),
            "--records", str(tmp_path / "pred")]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "pred" / "records.jsonl").read_text().splitlines()
    scored = [json.loads(x) for x in lines]
    assert len(scored) == 24 and all(r["true_selected"]["RV"]["dice"] == 1.0 for r in scored)
    assert all(r["estimate"]["calibrator"] == "isotonic" for r in scored)
    # the online path (monitor, serve) gives the same estimate for the same case
    from qcloop.monitor.data import discover, load_case
    from qcloop.monitor.ops.scoring import load_online_scorers

    scorer = load_online_scorers(run, ["SA"], runtime="torch")["SA"]
    source = next(
        s for s in discover(tiny_cohort) if s.image_path.name == Path(records[0]["image"]).name
    )
    online = scorer.score(load_case(source)).record
    assert online["estimate"] == records[0]["estimate"]


def test_evaluate_qc_refuses_data_without_ground_truth(tiny_run, tiny_cohort, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort / "001", data / "001")
    shutil.copy(tiny_cohort / "dataset_information.csv", data)
    for gt in data.rglob("*_gt.nii.gz"):
        gt.unlink()
    args = ["evaluate-qc", "--run", str(tiny_run), "--data", str(data), "--view", "SA"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "no scored case has ground truth" in result.output
