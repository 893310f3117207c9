"""The events the monitor emits, as any plugin receives them: every kind with the monitor's
service id, the window's causes, the exporter blocked, the reference median's sources, and the
one window per view publishing every change in order."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qcloop.monitor import (
    AdmissionChanged,
    CaseFailed,
    CaseScored,
    DriftAlert,
    ModelRef,
    ModelRefined,
    ModelsLoaded,
    ModelVersionPromoted,
    ModelVersionRegistered,
    ServiceInfo,
    WindowChanged,
    WindowStats,
    hookimpl,
)
from qcloop.monitor.core.plugin_manager import get_plugin_manager
from qcloop.monitor.ops.monitor import Monitor
from qcloop.monitor.ops.windows import ViewWindows
from qcloop.plugins.prometheus.exporter import service_metrics
from tests.monitor_support import (
    FakeRegistry,
    champions_of,
    exporter_samples,
    feed_inbox,
    monitor_cfg,
    read_records,
)
from tests.prom_servers import free_port

EVENT_TYPES = (
    CaseScored,
    CaseFailed,
    WindowChanged,
    DriftAlert,
    ModelRefined,
    ModelVersionRegistered,
    ModelVersionPromoted,
    ModelsLoaded,
    AdmissionChanged,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class EventLog:
    """A second subscriber plugin: every service hook and every event it receives."""

    def __init__(self) -> None:
        self.services: list[tuple[str, ServiceInfo]] = []
        self.events: list[Any] = []

    @hookimpl
    def on_service_started(self, service: ServiceInfo) -> None:
        self.services.append(("started", service))

    @hookimpl
    def on_service_stopped(self, service: ServiceInfo) -> None:
        self.services.append(("stopped", service))

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def _subscribe(kind: str) -> Callable[[EventLog, Any], None]:
    def record(self: EventLog, event: Any) -> None:
        self.events.append(event)

    return hookimpl(specname=f"on_{kind}")(record)


for _type in EVENT_TYPES:
    setattr(EventLog, f"record_{_type.kind}", _subscribe(_type.kind))


def test_a_second_subscriber_receives_every_event_the_monitor_emits(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    events = EventLog()
    get_plugin_manager().register(events, name="test-event-log")
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    feed_inbox(inbox, tiny_cohort, "SA", {"B", "C"}, 4)
    (inbox / "notes.txt").write_text("not an image")

    def fake_refine(window: Path, run: Path, out_run: Path, view: str, cfg: Any) -> dict:
        shutil.copytree(run, out_run)  # a loadable "refined" run
        return {"views": {view: {"cases": 4, "flagged": 2}}}

    registry = FakeRegistry(promote=True)
    mon = Monitor(
        inbox,
        out,
        # Alertmanager may act on 4 cases; the monitor's own policy never alerts here
        monitor_cfg(
            run_copy,
            refine_on_alert=True,
            min_cases=4,
            ood_fraction_limit=1.0,
            median_pdc_shift_limit=1.0,
        ),
        champions_of(run_copy, ("SA",)),
        registry=registry,
        gate_fn=registry.gate,
        refine_fn=fake_refine,
        settle_s=0,
    )
    assert events.services == [("started", mon.service)]
    assert mon.step() == 5
    assert mon.receive_alert("SA", {"labels": {"alertname": "QcloopPdcShift"}}) == "queued"
    mon.run_pending()
    s = exporter_samples(mon)  # the exporter, a subscriber like any other, saw the same events
    mon.close()
    assert events.services == [("started", mon.service), ("stopped", mon.service)]
    kinds = {type(e) for e in events.events}
    assert kinds == {CaseScored, CaseFailed, WindowChanged, DriftAlert, ModelRefined, ModelsLoaded}
    assert {e.service for e in events.events} == {mon.service.id}
    (failed,) = events.of(CaseFailed)
    assert (failed.stage, failed.source) == ("read", "notes.txt")
    assert "not a NIfTI" in failed.reason
    assert len(events.of(CaseScored)) == 4
    windows = events.of(WindowChanged)
    assert [w.cause for w in windows] == ["restore", "case", "case", "case", "case", "reset"]
    assert [w.stats.n for w in windows] == [0, 1, 2, 3, 4, 0]
    assert [w.model_version for w in windows] == ["1"] * 5 + ["2"]
    reference = windows[0].reference_median
    assert reference is not None and all(w.reference_median == reference for w in windows)
    (alert,) = events.of(DriftAlert)
    assert (alert.view, alert.source, alert.window.n) == ("SA", "alertmanager", 4)
    (refined,) = events.of(ModelRefined)
    assert refined.view == "SA" and refined.summary["cases"] == 4
    loads = events.of(ModelsLoaded)
    assert [(m.reload, m.views["SA"]["version"]) for m in loads] == [(False, "1"), (True, "2")]
    assert loads[0].views["SA"]["runtime"] == "torch" and loads[0].outcome == "ok"
    assert s[("qcloop_case_errors_total", (("stage", "read"),))] == 1
    assert s[("qcloop_drift_alerts_total", (("source", "alertmanager"), ("view", "SA")))] == 1
    assert s[("qcloop_window_cases", (("view", "SA"),))] == 0  # reset: a new champion
    assert ("qcloop_pdc_window_median", (("view", "SA"),)) not in s


@pytest.mark.parametrize("how", ["environment", "configuration"])
def test_the_monitor_scores_with_the_exporter_blocked(
    how: str, run_copy: Path, tiny_cohort: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    exporter = "qcloop.plugins.prometheus.exporter"
    port = free_port()
    cfg = monitor_cfg(run_copy, http_port=port)
    if how == "environment":
        plugin_env.setenv("QCLOOP_BLOCK_PLUGINS", exporter)
    else:
        cfg = cfg.model_copy(
            update={"plugins": cfg.plugins.model_copy(update={"block": [exporter]})}
        )
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    feed_inbox(inbox, tiny_cohort, "SA", {"A"}, 2)
    with Monitor(inbox, out, cfg, champions_of(run_copy, ("SA",)), settle_s=0) as mon:
        assert get_plugin_manager().is_blocked(exporter)
        assert mon.step() == 2
        assert len(read_records(out)) == 2 and mon.window_stats("SA").n == 2
        # the monitor's own endpoint stays up; without an exporter it has no /metrics
        assert set(mon.service.endpoints) == {"healthz"}
        assert service_metrics(mon.service.id) is None
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert exc.value.code == 404


def test_reference_median_from_the_fences_else_the_validation_cases_else_none(
    run_copy: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    from qcloop.monitor.ops.reference import compute_reference
    from qcloop.monitor.ops.scoring import load_online_scorers

    scorer = load_online_scorers(run_copy, ["SA"])["SA"]
    recorded = compute_reference(run_copy, "SA", scorer)
    assert recorded is not None and recorded["source"].startswith("calibration cases")
    assert 0 < recorded["median_pdc"] <= 1 and recorded["cases"] > 0
    # a run trained before the calibration median was recorded: fences.json of format 1
    legacy = tmp_path / "legacy"
    shutil.copytree(run_copy, legacy)
    fences = legacy / "SA" / "fences.json"
    fences.write_text(json.dumps(json.loads(fences.read_text())["phases"]))
    computed = compute_reference(legacy, "SA", scorer)
    assert computed is not None and computed["source"].startswith("validation cases")
    assert computed["cases"] == recorded["cases"]
    assert computed["median_pdc"] == pytest.approx(recorded["median_pdc"], abs=0.02)
    # ... moved where its training data are not: no reference, the median rule is off
    info = json.loads((legacy / "run.json").read_text())
    (legacy / "run.json").write_text(json.dumps({**info, "data": str(tmp_path / "gone")}))
    assert compute_reference(legacy, "SA", scorer) is None
    champions = {"SA": ModelRef("qcloop-SA", "SA", "1", legacy)}
    with Monitor(tmp_path / "inbox", tmp_path / "out", monitor_cfg(legacy), champions) as mon:
        assert mon.views["SA"].reference_median is None
        assert ("qcloop_pdc_reference_median", (("view", "SA"),)) not in exporter_samples(mon)
        assert not (tmp_path / "out" / "reference.json").exists()


def test_view_windows_publish_every_change_in_order(plugin_env: pytest.MonkeyPatch) -> None:
    events = EventLog()
    pm = get_plugin_manager()
    pm.register(events, name="test-event-log")
    windows = ViewWindows(3, pm=pm, service="svc")
    assert windows.stats("SA") == WindowStats(0, 0.0, None) and windows.items("SA") == []
    pairs = [(True, 0.2), (False, 0.9)]
    windows.restore("SA", pairs, items=["a", "b"], model_version="3", reference_median=0.85)
    windows.add("SA", False, 0.7, "c")
    windows.add("SA", True, 0.1, "d")
    assert windows.items("SA") == ["b", "c", "d"] and windows.count("SA") == 3
    stats = windows.stats("SA")
    assert (stats.n, stats.ood_fraction, stats.median_pdc) == (3, pytest.approx(1 / 3), 0.7)
    windows.reset("SA", model_version="4", reference_median=None)
    seen = [
        (e.cause, e.stats.n, e.model_version, e.reference_median, e.service)
        for e in events.of(WindowChanged)
    ]
    assert seen == [
        ("restore", 2, "3", 0.85, "svc"),
        ("case", 3, "3", 0.85, "svc"),
        ("case", 3, "3", 0.85, "svc"),
        ("reset", 0, "4", None, "svc"),
    ]
    with pytest.raises(ValueError, match="2 items for 1 window cases"):
        windows.restore(
            "LA", [(True, 0.5)], items=["x", "y"], model_version="1", reference_median=None
        )
    with pytest.raises(ValueError, match="non-finite"):
        windows.add("SA", False, float("nan"))
    assert len(events.of(WindowChanged)) == 4  # refused changes publish nothing
    # cases added from several threads are published in the order they entered the window
    many = ViewWindows(1000, pm=pm, service="svc")
    threads = [
        threading.Thread(target=lambda: [many.add("LA", False, 0.5) for _ in range(50)])
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = [e.stats.n for e in events.of(WindowChanged) if e.view == "LA"]
    assert counts == list(range(1, 201))
