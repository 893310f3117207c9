"""The binomial drift rule: a window's OoD flags tested against the model's leave-one-out
in-distribution flag rate (``monitor/ops/drift.py``, ``monitor/method/reference_rate.py``), and
the benchmark that measures its false alarms and detection delays (``qcloop bench drift``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qcloop.monitor.core.events import WindowStats
from qcloop.monitor.ops.drift import DriftLimits, FlagReference, judge_drift

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def beta_binomial_tail(k: int, n: int, k0: int, n0: int) -> float:
    """P(X >= k), X ~ BetaBinomial(n, k0 + 1, n0 - k0 + 1), written out from its pmf."""
    a, b = k0 + 1, n0 - k0 + 1

    def log_beta(x: float, y: float) -> float:
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    return sum(
        math.comb(n, j) * math.exp(log_beta(j + a, n - j + b) - log_beta(a, b))
        for j in range(k, n + 1)
    )


@pytest.mark.parametrize(("k", "n", "k0", "n0"), [(7, 10, 3, 20), (2, 10, 3, 20), (25, 50, 2, 20)])
def test_the_tail_probability_is_the_beta_binomial_one(k: int, n: int, k0: int, n0: int) -> None:
    got = FlagReference(k0, n0).tail_probability(k, n)
    assert got == pytest.approx(beta_binomial_tail(k, n, k0, n0), rel=1e-9)


def test_the_rule_alerts_exactly_below_alpha() -> None:
    limits, ref = DriftLimits(min_cases=10, alert_alpha=0.01), FlagReference(3, 20)
    for k in range(11):
        decision = judge_drift(WindowStats(10, k / 10, None), None, limits, ref)
        assert decision.alert == (beta_binomial_tail(k, 10, 3, 20) < 0.01), k
    (reason,) = judge_drift(WindowStats(10, 0.9, None), None, limits, ref).reasons
    assert "9 of 10 cases flagged" in reason and "3 of 20 reference cases" in reason
    assert not judge_drift(WindowStats(9, 1.0, None), None, limits, ref).alert  # < min_cases


def test_a_smaller_reference_asks_for_more_evidence() -> None:
    limits = DriftLimits(min_cases=10, alert_alpha=0.01)
    few, many = FlagReference(3, 20), FlagReference(30, 200)  # the same rate, 10x the cases
    window = WindowStats(20, 0.45, None)
    assert judge_drift(window, None, limits, many).alert
    assert not judge_drift(window, None, limits, few).alert


def test_without_a_reference_rate_the_fixed_limit_applies() -> None:
    limits = DriftLimits(min_cases=10, ood_fraction_limit=0.3)
    decision = judge_drift(WindowStats(10, 0.4, None), None, limits, None)
    assert decision.alert and "OoD fraction 0.400 > limit 0.300" in decision.reasons[0]
    fixed = DriftLimits(min_cases=10, rule="fixed")
    assert judge_drift(WindowStats(10, 0.4, None), None, fixed, FlagReference(3, 20)).alert


def test_the_configuration_sets_the_rule() -> None:
    from qcloop.monitor.core.config import QcloopConfig

    cfg = QcloopConfig.model_validate({"monitoring": {"drift_rule": "fixed", "alert_alpha": 0.05}})
    limits = DriftLimits.from_config(cfg.monitoring)
    assert (limits.rule, limits.alert_alpha) == ("fixed", 0.05)
    assert DriftLimits.from_config(QcloopConfig().monitoring).rule == "binomial"
    with pytest.raises(ValueError, match="alert_alpha"):
        QcloopConfig.model_validate({"monitoring": {"alert_alpha": 0.7}})


def test_the_reference_rate_of_a_run_is_measured_leave_one_out(tiny_run: Path) -> None:
    from qcloop.monitor.method.reference_rate import reference_flags_of_run

    counts = reference_flags_of_run(tiny_run, "SA")
    assert counts is not None
    info = json.loads((tiny_run / "run.json").read_text())
    assert counts["loo_cases"] == info["views"]["SA"]["val_cases"]
    assert 0 <= counts["loo_flagged"] <= counts["loo_cases"]


def test_simulated_policy_alerts_and_waits_min_cases_between_alerts() -> None:
    from qcloop.monitor.benchmarks.drift import critical_flags, simulate_alerts

    limits = DriftLimits(min_cases=10, alert_alpha=0.01)
    table = critical_flags(limits, FlagReference(3, 20), 50)
    assert table[:10] == list(range(1, 11))  # below min_cases: never
    flagged = [(True, 0.5)] * 40
    assert simulate_alerts(flagged, limits, table, 50, None) == [9, 19, 29, 39]
    assert simulate_alerts([(False, 0.9)] * 40, limits, table, 50, None) == []
    assert simulate_alerts([(False, 0.5)] * 20, limits, table, 50, 0.9) == [9, 19]


@pytest.mark.slow
def test_the_drift_benchmark_reports_both_rules(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    from qcloop.monitor.benchmarks.drift import run_drift_benchmark
    from qcloop.monitor.cli.demo_run import evaluate_run
    from qcloop.monitor.core.config import load_config

    evals = evaluate_run(tiny_run, tiny_cohort, load_config(tiny_run / "config.yaml"))
    path = tmp_path / "evaluations.jsonl"
    path.write_text("".join(json.dumps({"config": "M/M+QC", **e.to_dict()}) + "\n" for e in evals))
    figures = run_drift_benchmark(tiny_run, path, draws=2000, repeats=10)
    for view in ("SA", "LA"):
        v = figures["views"][view]
        assert v["reference_flags"] is not None
        for rule in ("fixed", "binomial"):
            assert v[rule]["false_alarms_per_1000[flags]"] >= 0
            delays = [x for key, x in v[rule].items() if key.startswith("cases_to_alert")]
            assert delays and all(d["median"] > 0 for d in delays)


@pytest.mark.slow
def test_the_drift_benchmark_on_a_fresh_cohort_feeds_each_new_case_once(
    tiny_run: Path, tmp_path: Path
) -> None:
    """``bench drift --fresh N``: N new vendor-A subjects (2 cases per view) and shifted ones
    are generated with their own seed, scored by the run, and the in-distribution stream is
    exactly those cases."""
    from click.testing import CliRunner

    from qcloop.monitor.cli.main import cli
    from qcloop.monitor.data import discover

    work = tmp_path / "fresh"
    args = ["bench", "drift", "--run", str(tiny_run), "--fresh", "10", "--fresh-shifted", "2"]
    args += ["--fresh-grid", "tiny", "--repeats", "10", "--work", str(work), "--json"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output[result.output.index("{") :])
    assert figures["settings"]["fresh"] is True
    sources = discover(work / "data", views=["SA"])
    assert sorted({s.vendor for s in sources}) == ["A", "B", "C"]
    for view in ("SA", "LA"):
        v = figures["views"][view]
        assert v["pool_sizes"] == {"A": 20, "B": 4, "C": 4}
        assert v["in_distribution_cases"] == 20
        assert 0 <= v["in_distribution_flag_rate"] <= 1
        for rule in ("fixed", "binomial"):
            assert v[rule]["false_alarms_per_1000[flags]"] >= 0
    # --evaluations and --fresh exclude each other
    both = CliRunner().invoke(cli, [*args[:4], "--fresh", "10", "--evaluations", __file__])
    assert both.exit_code == 2 and "exactly one of" in both.output
