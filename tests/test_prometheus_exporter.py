"""The Prometheus exporter: metrics from qcloop's events, served over HTTP on 127.0.0.1."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qcloop.monitor.core.plugin_manager import get_plugin_manager
from qcloop.monitor.ops.drift import RollingWindow, decision_pdc
from qcloop.plugins.prometheus.exporter import QcMetrics


def record(view: str = "SA", ood: bool = False, rv: float = 0.9, phase: str = "ED") -> dict:
    cand = {
        "LV": {"pdc": 0.95, "phd_mm": 3.0, "phd95_mm": 2.0, "penalised": False},
        "MYO": {"pdc": 0.85, "phd_mm": 4.0, "phd95_mm": 3.0, "penalised": False},
        "RV": {"pdc": rv, "phd_mm": 9.0, "phd95_mm": 6.0, "penalised": False},
    }
    worse = {k: {**v, "pdc": v["pdc"] - 0.1, "phd_mm": v["phd_mm"] + 5} for k, v in cand.items()}
    return {
        "subject": "case-should-never-be-a-label",
        "view": view,
        "phase": phase,
        "decision_structure": "RV",
        "candidates": [worse, cand],
        "fences": {"pdc_low": 0.7, "phd_high": 20.0},
        "ood": ood,
        "model": {"version": "3"},
        "runtime": {"name": "torch"},
        "latency_s": 0.2,
    }


def samples(metrics: QcMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.exposition().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def metrics(plugin_env: pytest.MonkeyPatch) -> Iterator[QcMetrics]:
    m = QcMetrics(window=4).activate()
    yield m
    m.deactivate()


def test_case_events_update_histograms_counters_and_window(metrics: QcMetrics) -> None:
    pm = get_plugin_manager()
    for ood, rv in [(False, 0.9), (True, 0.4), (False, 0.8), (True, 0.3), (True, 0.2)]:
        pm.notify_case_scored(record(ood=ood, rv=rv))
    s = samples(metrics)
    v = (("model_version", "3"), ("view", "SA"))
    assert s[("qcloop_cases_scored_total", v)] == 5
    assert s[("qcloop_cases_flagged_total", v)] == 3
    # window of 4: the first case dropped out -> 3 of 4 flagged, median RV pDC of .4 .8 .3 .2
    assert s[("qcloop_ood_fraction", (("view", "SA"),))] == 0.75
    assert s[("qcloop_pdc_window_median", (("view", "SA"),))] == pytest.approx(0.35)
    assert s[("qcloop_window_cases", (("view", "SA"),))] == 4
    rv = (("model_version", "3"), ("structure", "RV"), ("view", "SA"))
    assert s[("qcloop_pdc_count", rv)] == 5
    # best pHD over candidates is observed: 9.0 mm for each case
    assert s[("qcloop_phd_mm_sum", rv)] == pytest.approx(45.0)
    assert s[("qcloop_fence_pdc_low", (("phase", "ED"), ("view", "SA")))] == 0.7
    assert s[("qcloop_case_latency_seconds_count", (("runtime", "torch"), ("view", "SA")))] == 5
    text = metrics.exposition().decode()
    assert "case-should-never-be-a-label" not in text


def test_lifecycle_events_are_counted(metrics: QcMetrics) -> None:
    pm = get_plugin_manager()
    pm.notify_drift_alert({"view": "LA", "source": "alertmanager"})
    pm.notify_model_refined("LA", "/tmp/run2", {})
    pm.notify_model_version_registered("qcloop-LA", "2", {})
    pm.notify_model_version_promoted("qcloop-LA", "2", "champion", "1")
    s = samples(metrics)
    assert s[("qcloop_drift_alerts_total", (("source", "alertmanager"), ("view", "LA")))] == 1
    assert s[("qcloop_refinements_total", (("view", "LA"),))] == 1
    assert s[("qcloop_model_versions_registered_total", (("name", "qcloop-LA"),))] == 1
    assert s[("qcloop_promotions_total", (("alias", "champion"), ("name", "qcloop-LA")))] == 1


def test_inactive_metrics_receive_nothing(plugin_env: pytest.MonkeyPatch) -> None:
    m = QcMetrics()
    get_plugin_manager().notify_case_scored(record())
    assert ("qcloop_cases_scored_total", (("model_version", "3"), ("view", "SA"))) not in samples(m)


def test_http_endpoint_on_loopback(metrics: QcMetrics) -> None:
    metrics.observe_case(record(view="LA"))
    server = metrics.serve("127.0.0.1", 0)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert 'qcloop_cases_scored_total{model_version="3",view="LA"} 1.0' in body
    finally:
        server.close()


def test_rolling_window_and_decision_pdc() -> None:
    w = RollingWindow(3)
    assert w.stats().to_dict() == {"n": 0, "ood_fraction": 0.0, "median_pdc": None}
    for ood, p in [(True, 0.1), (False, 0.5), (False, 0.9), (True, 0.3)]:
        w.add(ood, p)
    st = w.stats()
    assert (st.n, st.ood_fraction, st.median_pdc) == (3, pytest.approx(1 / 3), 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        w.add(False, float("nan"))
    rec: dict[str, Any] = record(rv=0.6)
    assert decision_pdc(rec) == 0.6
    rec["decision_structure"] = "mean"
    assert decision_pdc(rec) == pytest.approx((0.95 + 0.85 + 0.6) / 3)
    with pytest.raises(ValueError):
        RollingWindow(0)


def test_window_reset_and_restore_do_not_count_cases_again(metrics: QcMetrics) -> None:
    for ood, rv in [(True, 0.2), (False, 0.8)]:
        metrics.observe_case(record(ood=ood, rv=rv))
    metrics.reset_window("SA")
    s = samples(metrics)
    assert s[("qcloop_window_cases", (("view", "SA"),))] == 0
    assert s[("qcloop_ood_fraction", (("view", "SA"),))] == 0
    # an empty window has no median: no stale value for the PdcShift rule to fire on
    assert ("qcloop_pdc_window_median", (("view", "SA"),)) not in s
    metrics.restore_window("SA", [(True, 0.2), (False, 0.6), (True, 0.3), (True, 0.1), (True, 0.9)])
    s = samples(metrics)
    assert s[("qcloop_window_cases", (("view", "SA"),))] == 4  # window of 4: oldest dropped
    assert s[("qcloop_ood_fraction", (("view", "SA"),))] == 0.75
    assert s[("qcloop_pdc_window_median", (("view", "SA"),))] == pytest.approx(0.45)
    assert s[("qcloop_cases_scored_total", (("model_version", "3"), ("view", "SA")))] == 2
