"""The Prometheus exporter: per-service metrics driven by qcloop's events only (the monitor's
own /metrics server on 127.0.0.1, /metrics and the HTTP metrics mounted on a serve app)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qcloop.monitor import (
    AdmissionChanged,
    CaseFailed,
    CaseScored,
    DriftAlert,
    ModelRefined,
    ModelsLoaded,
    ModelVersionPromoted,
    ModelVersionRegistered,
    ServiceInfo,
    WindowStats,
)
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.plugin_manager import QcloopPluginManager, get_plugin_manager
from qcloop.monitor.ops.drift import RollingWindow, decision_pdc
from qcloop.monitor.ops.windows import ViewWindows
from qcloop.plugins.prometheus.exporter import QcMetrics, service_metrics


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


def samples(metrics: QcMetrics | None) -> dict[tuple[str, tuple], float]:
    assert metrics is not None
    text = metrics.exposition().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _config(http_port: int = 0) -> QcloopConfig:
    cfg = QcloopConfig()
    return cfg.model_copy(
        update={"monitoring": cfg.monitoring.model_copy(update={"http_port": http_port})}
    )


@pytest.fixture
def pm(plugin_env: pytest.MonkeyPatch) -> QcloopPluginManager:
    return get_plugin_manager()


@pytest.fixture
def monitor(pm: QcloopPluginManager) -> Iterator[ServiceInfo]:
    """A monitor service as the exporter sees it (no app: no endpoint)."""
    service = ServiceInfo(kind="monitor", config=_config())
    pm.service_started(service)
    yield service
    pm.service_stopped(service)


def test_case_events_update_histograms_counters_and_the_core_window(
    pm: QcloopPluginManager, monitor: ServiceInfo
) -> None:
    windows = ViewWindows(4, pm=pm, service=monitor.id)
    for ood, rv in [(False, 0.9), (True, 0.4), (False, 0.8), (True, 0.3), (True, 0.2)]:
        rec = record(ood=ood, rv=rv)
        pm.emit(CaseScored(rec, service=monitor.id))
        windows.add("SA", ood, decision_pdc(rec))
    s = samples(service_metrics(monitor.id))
    v = (("view", "SA"),)
    assert s[("qcloop_cases_scored_total", v)] == 5
    assert s[("qcloop_cases_flagged_total", v)] == 3
    # window of 4: the first case dropped out -> 3 of 4 flagged, median RV pDC of .4 .8 .3 .2
    assert s[("qcloop_ood_fraction", (("view", "SA"),))] == 0.75
    assert s[("qcloop_pdc_window_median", (("view", "SA"),))] == pytest.approx(0.35)
    assert s[("qcloop_window_cases", (("view", "SA"),))] == 4
    rv = (("structure", "RV"), ("view", "SA"))
    assert s[("qcloop_pdc_count", rv)] == 5
    # best pHD over candidates is observed: 9.0 mm for each case
    assert s[("qcloop_phd_mm_sum", rv)] == pytest.approx(45.0)
    assert s[("qcloop_fence_pdc_low", (("phase", "ED"), ("view", "SA")))] == 0.7
    assert s[("qcloop_case_latency_seconds_count", (("runtime", "torch"), ("view", "SA")))] == 5
    text = service_metrics(monitor.id).exposition().decode()  # type: ignore[union-attr]
    assert "case-should-never-be-a-label" not in text
    # a client's phase becomes a label value only when it is a known one
    for phase in ("frame-17", "../../x", "ES"):
        pm.emit(CaseScored(record(phase=phase), service=monitor.id))
    phases = {
        dict(labels)["phase"] for name, labels in samples(service_metrics(monitor.id))
        if name == "qcloop_fence_pdc_low"
    }  # fmt: skip
    assert phases == {"ED", "ES", "all"}


def test_lifecycle_events_are_counted(pm: QcloopPluginManager, monitor: ServiceInfo) -> None:
    window = WindowStats(0, 0.0, None)
    pm.emit(
        DriftAlert("LA", "alertmanager", (), window, None, {}, "2026-12-02", service=monitor.id)
    )
    pm.emit(ModelRefined("LA", "/tmp/run2", {}, service=monitor.id))
    # the registry's lifecycle is emitted outside the service's own code: no service id
    pm.emit(ModelVersionRegistered("qcloop-LA", "2", {}))
    pm.emit(ModelVersionPromoted("qcloop-LA", "2", "champion", "1"))
    pm.emit(CaseFailed("validate", "too many slices", "upload", service=monitor.id))
    s = samples(service_metrics(monitor.id))
    assert s[("qcloop_drift_alerts_total", (("source", "alertmanager"), ("view", "LA")))] == 1
    assert s[("qcloop_refinements_total", (("view", "LA"),))] == 1
    assert s[("qcloop_model_versions_registered_total", (("name", "qcloop-LA"),))] == 1
    assert s[("qcloop_promotions_total", (("alias", "champion"), ("name", "qcloop-LA")))] == 1
    assert s[("qcloop_case_errors_total", (("stage", "validate"),))] == 1


def test_events_of_other_services_and_batch_commands_are_ignored(
    pm: QcloopPluginManager, monitor: ServiceInfo
) -> None:
    key = ("qcloop_cases_scored_total", (("view", "SA"),))
    pm.emit(CaseScored(record(), service="not-started-here"))
    assert key not in samples(service_metrics(monitor.id))
    pm.emit(CaseScored(record(), service=monitor.id))
    assert samples(service_metrics(monitor.id))[key] == 1
    pm.service_stopped(monitor)
    assert service_metrics(monitor.id) is None
    pm.emit(CaseScored(record()))  # a batch command (`qcloop assess`): no service runs


def test_the_monitor_app_gets_metrics_and_forgets_them_with_the_service(
    pm: QcloopPluginManager,
) -> None:
    """The exporter adds /metrics (and request counting) to the monitor's Starlette app, as to
    serve's FastAPI app; the monitor itself serves that app on its one port."""
    from starlette.testclient import TestClient

    from qcloop.monitor.ops.http_app import monitor_app

    app = monitor_app(lambda: {"status": "ok"}, None)
    service = ServiceInfo(kind="monitor", config=_config(), app=app)
    pm.service_started(service)
    try:
        pm.emit(CaseScored(record(view="LA"), service=service.id))
        with TestClient(app) as client:
            assert client.get("/healthz").status_code == 200
            body = client.get("/metrics").text
        assert 'qcloop_cases_scored_total{view="LA"} 1.0' in body
        assert 'qcloop_http_requests_total{endpoint="/healthz",method="GET",status="200"}' in body
    finally:
        pm.service_stopped(service)
    assert service_metrics(service.id) is None


def test_serve_app_gets_metrics_route_middleware_and_http_metrics(
    pm: QcloopPluginManager,
) -> None:
    import httpx
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/items/{item}")
    async def item(item: str) -> dict[str, str]:
        return {"item": item}

    service = ServiceInfo(kind="serve", config=_config(), app=app)
    pm.service_started(service)
    try:
        assert service.endpoints == {}  # serve mounts /metrics on its own app
        assert "/metrics" in app.openapi()["paths"]
        models = {"SA": {"name": "qcloop-SA", "version": "3", "runtime": "onnxruntime"}}
        pm.emit(ModelsLoaded(models, service=service.id))
        pm.emit(
            ModelsLoaded(
                {**models, "SA": {**models["SA"], "version": "4"}}, reload=True, service=service.id
            )
        )
        pm.emit(ModelsLoaded({}, outcome="failed", reload=True, error="gone", service=service.id))
        pm.emit(AdmissionChanged(running=2, waiting=1, service=service.id))
        pm.emit(AdmissionChanged(running=2, waiting=1, rejected=True, service=service.id))

        async def requests() -> str:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                assert (await client.get("/items/a")).status_code == 200
                assert (await client.get("/items/b")).status_code == 200
                assert (await client.get("/nowhere")).status_code == 404
                return (await client.get("/metrics")).text

        body = asyncio.run(requests())
    finally:
        pm.service_stopped(service)
    s = {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for f in text_string_to_metric_families(body)
        for x in f.samples
    }
    ok = (("endpoint", "/items/{item}"), ("method", "GET"), ("status", "200"))
    assert s[("qcloop_http_requests_total", ok)] == 2  # by route template, never raw path
    missing = (("endpoint", "unmatched"), ("method", "GET"), ("status", "404"))
    assert s[("qcloop_http_requests_total", missing)] == 1
    assert s[("qcloop_http_request_duration_seconds_count", (("endpoint", "/items/{item}"),))] == 2
    info = (("runtime", "onnxruntime"), ("version", "4"), ("view", "SA"))
    assert s[("qcloop_model_info", info)] == 1
    assert (
        "qcloop_model_info",
        (("runtime", "onnxruntime"), ("version", "3"), ("view", "SA")),
    ) not in s
    assert s[("qcloop_model_reloads_total", (("outcome", "ok"),))] == 1
    assert s[("qcloop_model_reloads_total", (("outcome", "failed"),))] == 1
    assert s[("qcloop_http_in_flight", ())] == 2
    assert s[("qcloop_http_queue_depth", ())] == 1
    assert s[("qcloop_http_rejected_total", ())] == 1


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


def test_window_reset_and_restore_do_not_count_cases_again(
    pm: QcloopPluginManager, monitor: ServiceInfo
) -> None:
    windows = ViewWindows(4, pm=pm, service=monitor.id)
    for ood, rv in [(True, 0.2), (False, 0.8)]:
        pm.emit(CaseScored(record(ood=ood, rv=rv), service=monitor.id))
        windows.add("SA", ood, rv)
    windows.reset("SA", model_version="4", reference_median=None)
    s = samples(service_metrics(monitor.id))
    assert s[("qcloop_window_cases", (("view", "SA"),))] == 0
    assert s[("qcloop_ood_fraction", (("view", "SA"),))] == 0
    # an empty window has no median: no stale value for the PdcShift rule to fire on
    assert ("qcloop_pdc_window_median", (("view", "SA"),)) not in s
    pairs = [(True, 0.2), (False, 0.6), (True, 0.3), (True, 0.1), (True, 0.9)]
    windows.restore("SA", pairs, model_version="4", reference_median=0.8)
    s = samples(service_metrics(monitor.id))
    assert s[("qcloop_window_cases", (("view", "SA"),))] == 4  # window of 4: oldest dropped
    assert s[("qcloop_ood_fraction", (("view", "SA"),))] == 0.75
    assert s[("qcloop_pdc_window_median", (("view", "SA"),))] == pytest.approx(0.45)
    assert s[("qcloop_pdc_reference_median", (("view", "SA"),))] == 0.8
    assert s[("qcloop_cases_scored_total", (("view", "SA"),))] == 2
