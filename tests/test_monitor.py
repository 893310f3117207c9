"""`qcloop monitor`: inbox processing, restart idempotence, rejection of bad files, the drift
policy, refinement on alerts, the Alertmanager webhook, and the metrics endpoint (the Prometheus
exporter, fed by the monitor's events only). The events themselves: test_monitor_events.py."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from qcloop.monitor import (
    WindowStats,
)
from qcloop.monitor.core.config import RefinementConfig
from qcloop.monitor.core.http_endpoint import HttpEndpoint
from qcloop.monitor.data import discover
from qcloop.monitor.ops.drift import DriftLimits, judge_drift
from qcloop.monitor.ops.http_app import monitor_app
from qcloop.monitor.ops.inbox import read_identity
from qcloop.monitor.ops.ledger import JsonlLog
from qcloop.monitor.ops.monitor import Monitor
from qcloop.monitor.ops.webhook import AlertDispatcher, parse_payload
from tests.monitor_support import (
    FakeRegistry,
    champions_of,
    exporter_samples,
    feed_inbox,
    monitor_cfg,
    read_records,
)
from tests.prom_servers import free_port

SECRET = "s3cret-for-tests"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_inbox_cases_are_scored_with_records_masks_and_ledger(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    fed = feed_inbox(inbox, tiny_cohort, "SA", {"A"}, 3) + feed_inbox(
        inbox, tiny_cohort, "LA", {"B"}, 1
    )
    # a case named without view or phase, described by its sidecar JSON
    src = next(s for s in discover(tiny_cohort, views=["SA"]) if s.vendor == "C")
    shutil.copy2(src.image_path, inbox / "scan-x.nii.gz")
    (inbox / "scan-x.json").write_text(json.dumps({"view": "SA", "phase": "ES", "vendor": "C"}))
    mon = Monitor(inbox, out, monitor_cfg(run_copy), champions_of(run_copy), settle_s=0)
    assert mon.step() == 5
    assert sorted(p.name for p in inbox.iterdir()) == []
    recs = read_records(out)
    assert len(recs) == 5 and len({r["sha256"] for r in recs}) == 5
    by_source = {r["source_file"]: r for r in recs}
    side = by_source["scan-x.nii.gz"]
    assert (side["view"], side["phase"], side["vendor"]) == ("SA", "ES", "C")
    for path in [*fed, inbox / "scan-x.nii.gz"]:
        rec = by_source[path.name]
        mask = nib.load(rec["mask"])
        image = nib.load(rec["image"])  # the input now lives under processed/
        assert Path(rec["image"]).is_relative_to(out / "processed" / rec["view"])
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 3}
        assert rec["model"]["version"] == "1" and isinstance(rec["ood"], bool)
        # a QC figure for each flagged case (the monitor's default --figures flagged)
        assert ("figure" in rec) == rec["ood"], rec.get("figure_error")
        if rec["ood"]:
            assert Path(rec["figure"]) == out / "figures" / f"{rec['case_id']}.png"
            assert Path(rec["figure"]).read_bytes()[:4] == b"\x89PNG"
    assert any(r["ood"] for r in recs)  # the figure check above is not vacuous
    assert (out / "processed/SA/000005/000005_SA_ES.source.json").is_file()
    # processed/<view> is a dataset folder in the M&Ms-2 layout (refinement windows are too)
    assert len(discover(out / "processed" / "SA")) == 4
    ledger = [e for e in JsonlLog(out / "ledger.jsonl").read() if e["event"] == "case"]
    assert [e["seq"] for e in ledger] == [1, 2, 3, 4, 5]
    s = exporter_samples(mon)
    assert s[("qcloop_cases_scored_total", (("view", "SA"),))] == 4
    info = (("runtime", "torch"), ("version", "1"), ("view", "SA"))
    assert s[("qcloop_model_info", info)] == 1  # the monitor's models, as serve's
    assert s[("qcloop_window_cases", (("view", "SA"),))] == 4
    ref = s[("qcloop_pdc_reference_median", (("view", "SA"),))]
    assert ref == pytest.approx(mon.views["SA"].reference_median) and 0 < ref <= 1
    cached = json.loads((out / "reference.json").read_text())
    assert {k.split("|")[0] for k in cached} == {"SA", "LA"}
    mon.close()


def test_restart_scores_nothing_twice_and_loses_nothing(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    fed = feed_inbox(inbox, tiny_cohort, "SA", {"B", "C"}, 6)
    cfg, champs = monitor_cfg(run_copy), champions_of(run_copy, ("SA",))
    first = Monitor(inbox, out, cfg, champs, settle_s=0)
    for path in fed[:3]:
        assert first.process_file(path) == "scored"
    # crash states: the last ledger line never written, an input never moved, a torn append
    ledger_lines = (out / "ledger.jsonl").read_text().splitlines(keepends=True)
    (out / "ledger.jsonl").write_text("".join(ledger_lines[:-1]))
    moved = out / read_records(out)[1]["processed"]
    shutil.copy2(moved, inbox / fed[1].name)
    moved.unlink()
    with open(out / "records.jsonl", "a") as fh:
        fh.write('{"view": "SA", "torn')
    first.close()

    calls: list[str] = []
    second = Monitor(inbox, out, cfg, champs, settle_s=0)
    original = second.views["SA"].scorer.score

    def counting(case: Any) -> Any:
        calls.append(case.source.image_path.name)
        return original(case)

    second.views["SA"].scorer.score = counting
    assert len(second.views["SA"].window) == 3  # window restored from the ledger
    second.step()
    assert sorted(calls) == sorted(p.name for p in fed[3:])  # only the new cases were scored
    recs = read_records(out)
    assert len(recs) == 6 and len({r["sha256"] for r in recs}) == 6
    ledger = [e for e in JsonlLog(out / "ledger.jsonl").read() if e["event"] == "case"]
    assert sorted(e["seq"] for e in ledger) == [1, 2, 3, 4, 5, 6]
    assert all((out / e["processed"]).is_file() for e in ledger)
    assert list(inbox.iterdir()) == []
    # the same content dropped again is a duplicate, not a new case
    shutil.copy2(out / ledger[0]["processed"], inbox / "again_SA_ED.nii.gz")
    second.step()
    assert (out / "duplicates" / "again_SA_ED.nii.gz").is_file() and len(read_records(out)) == 6
    second.close()


def test_bad_files_are_rejected_with_reasons_and_the_loop_goes_on(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    good, other, third = feed_inbox(inbox, tiny_cohort, "SA", {"A"}, 3)
    la = feed_inbox(inbox, tiny_cohort, "LA", {"A"}, 1)[0]
    (inbox / "notes.txt").write_text("not an image")
    (inbox / "broken_SA_ED.nii.gz").write_bytes(b"\x1f\x8b garbage")
    other.rename(inbox / "noview.nii.gz")
    third.rename(inbox / "badside.nii.gz")
    (inbox / "badside.json").write_text("{not json")
    nib.save(
        nib.Nifti1Image(np.full((40, 40, 3), np.nan, np.float32), np.eye(4)),
        inbox / "nan_SA_ED.nii.gz",
    )
    mon = Monitor(inbox, out, monitor_cfg(run_copy), champions_of(run_copy, ("SA",)), settle_s=0)
    mon.step()
    reasons = {
        p.name[: -len(".reason.txt")]: p.read_text()
        for p in (out / "rejected").glob("*.reason.txt")
    }
    assert set(reasons) == {
        "notes.txt",
        "broken_SA_ED.nii.gz",
        "noview.nii.gz",
        "badside.nii.gz",
        "nan_SA_ED.nii.gz",
        la.name,
    }
    assert "not a NIfTI" in reasons["notes.txt"]
    assert "cannot tell the view" in reasons["noview.nii.gz"]
    assert "sidecar is not readable JSON" in reasons["badside.nii.gz"]
    assert "this monitor serves SA" in reasons[la.name]
    assert "NaN/Inf voxel" in reasons["nan_SA_ED.nii.gz"]
    for name in reasons:
        assert (out / "rejected" / name).is_file()
    assert (out / "rejected" / "badside.json").is_file()
    assert [r["source_file"] for r in read_records(out)] == [good.name]
    assert list(inbox.iterdir()) == []
    assert exporter_samples(mon)[("qcloop_case_errors_total", (("stage", "read"),))] == 6
    mon.close()


def test_drift_policy_arithmetic() -> None:
    limits = DriftLimits(min_cases=4, ood_fraction_limit=0.5, median_pdc_shift_limit=0.1)
    # too few cases: never an alert
    assert not judge_drift(WindowStats(3, 1.0, 0.1), 0.9, limits).alert
    # the OoD-fraction rule is strict
    assert not judge_drift(WindowStats(4, 0.5, 0.9), 0.9, limits).alert
    d = judge_drift(WindowStats(4, 0.75, 0.9), 0.9, limits)
    assert d.alert and len(d.reasons) == 1 and "OoD fraction 0.750 > limit 0.500" in d.reasons[0]
    # the median rule: below reference - limit
    assert not judge_drift(WindowStats(10, 0.0, 0.81), 0.9, limits).alert
    d = judge_drift(WindowStats(10, 0.0, 0.79), 0.9, limits)
    assert d.alert and "median pDC 0.790 < reference 0.900" in d.reasons[0]
    both = judge_drift(WindowStats(10, 0.6, 0.5), 0.9, limits)
    assert len(both.reasons) == 2
    # no reference: only the fraction rule
    assert not judge_drift(WindowStats(10, 0.0, 0.1), None, limits).alert
    json.dumps(both.to_dict(), allow_nan=False)


def test_alert_refines_registers_and_switches_to_the_promoted_model(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    fed = feed_inbox(inbox, tiny_cohort, "SA", {"B", "C"}, 8)
    cfg = monitor_cfg(run_copy, refine_on_alert=True, min_cases=4, ood_fraction_limit=0.3)
    registry = FakeRegistry(promote=True)
    mon = Monitor(
        inbox,
        out,
        cfg,
        champions_of(run_copy, ("SA",)),
        registry=registry,
        gate_fn=registry.gate,
        refinement=RefinementConfig.model_validate(
            {"refiner": {"name": "alpha", "params": {"max_slices_per_epoch": 8}}, "k_semi": 1}
        ),
        settle_s=0,
        cooldown_s=3600,
    )
    for path in fed[:4]:
        mon.process_file(path)
    assert mon.views["SA"].pending is not None  # shifted vendors: most cases are OoD
    assert mon.receive_alert("SA", {"labels": {"alertname": "QcloopOodFractionHigh"}}) == (
        "coalesced"
    )
    mon.run_pending()
    events = JsonlLog(out / "ledger.jsonl").read()
    kinds = [e["event"] for e in events]
    assert kinds[-3:] == ["alert", "window_reset", "refinement"]
    refinement = events[-1]
    assert refinement["source"] == "qcloop" and refinement["promoted"] is True
    first_four = read_records(out)[:4]
    assert refinement["window_cases"] == 4
    assert refinement["window_ood"] == sum(r["ood"] for r in first_four) >= 1
    assert refinement["refine_summary"]["cases"] == 4
    assert refinement["refine_summary"]["refiner"] == "alpha"
    call = registry.calls[0]
    assert call["tags"]["qcloop.alert_source"] == "qcloop"
    assert call["tags"]["qcloop.window_cases"] == "4"
    window = discover(call["window"])
    assert len(window) == 4 and {s.metadata["SPLIT"] for s in window} == {"window"}
    assert json.loads((call["window"] / "alert.json").read_text())["view"] == "SA"
    run_info = json.loads((call["run"] / "run.json").read_text())
    assert run_info["kind"] == "refined" and set(run_info["views"]) == {"SA"}
    # the monitor now serves the promoted version on an empty window
    assert mon.views["SA"].champion.version == "2" and len(mon.views["SA"].window) == 0
    for path in fed[4:]:
        mon.process_file(path)
    assert read_records(out)[-1]["model"]["version"] == "2"
    assert mon.views["SA"].pending is None  # cooldown: no second alert storm
    s = exporter_samples(mon)
    assert s[("qcloop_drift_alerts_total", (("source", "qcloop"), ("view", "SA")))] == 1
    assert s[("qcloop_refinements_total", (("view", "SA"),))] == 1
    assert s[("qcloop_window_cases", (("view", "SA"),))] == 4
    mon.close()


def test_alert_without_promotion_keeps_the_champion(
    run_copy: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[Path, str]] = []

    def fake_refine(window: Path, run: Path, out_run: Path, view: str, cfg: Any) -> dict:
        seen.append((window, view))
        out_run.mkdir(parents=True)
        return {"views": {view: {"cases": 1, "flagged": 1}}}

    cfg = monitor_cfg(run_copy, refine_on_alert=True)
    registry = FakeRegistry(promote=False)
    mon = Monitor(
        tmp_path / "inbox",
        tmp_path / "out",
        cfg,
        champions_of(run_copy, ("SA",)),
        registry=registry,
        gate_fn=registry.gate,
        refine_fn=fake_refine,
    )
    # an Alertmanager alert on a window too small to judge is answered, not acted on
    answer = mon.receive_alert("SA", {"labels": {"alertname": "QcloopPdcShift"}})
    assert answer.startswith("too few cases: the window holds 0")
    mon.run_pending()
    assert not (tmp_path / "out/ledger.jsonl").exists() or all(
        e["event"] != "alert" for e in JsonlLog(tmp_path / "out/ledger.jsonl").read()
    )
    assert mon.receive_alert("XX", {"labels": {}}).startswith("unknown view")
    assert seen == [] and registry.calls == []


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _am_payload(status: str = "firing", view: str | None = "SA") -> bytes:
    labels = {"alertname": "QcloopOodFractionHigh", "severity": "warning"}
    if view:
        labels["view"] = view
    return json.dumps(
        {
            "version": "4",
            "status": status,
            "receiver": "qcloop-monitor",
            "groupLabels": {"alertname": "QcloopOodFractionHigh"},
            "alerts": [
                {
                    "status": status,
                    "labels": labels,
                    "annotations": {"summary": "OoD fraction high"},
                    "startsAt": "2026-11-27T06:00:00Z",
                    "fingerprint": "abc",
                }
            ],
        }
    ).encode()


def test_webhook_requires_the_secret_and_valid_alertmanager_json() -> None:
    calls: list[tuple[str, dict]] = []

    def on_alert(view: str, alert: dict) -> str:
        calls.append((view, alert))
        return "queued"

    app = monitor_app(lambda: {"status": "ok"}, AlertDispatcher(on_alert, SECRET))
    hook = HttpEndpoint(app).start()
    try:
        assert hook.host == "127.0.0.1"
        url = hook.url + "/alertmanager"
        ok = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
        assert _post(url, _am_payload(), {})[0] == 401
        assert _post(url, _am_payload(), {"Authorization": "Bearer wrong"})[0] == 401
        assert _post(url, _am_payload(), {"Authorization": SECRET})[0] == 401
        assert calls == []
        code, body = _post(url, b"{not json", ok)
        assert code == 400 and "not JSON" in body["error"]
        assert _post(url, b'{"version": "4", "alerts": 3}', ok)[0] == 400
        assert _post(url.replace("/alertmanager", "/other"), _am_payload(), ok)[0] == 404
        code, body = _post(url, _am_payload(), ok)
        assert code == 202 and body["results"][0]["outcome"] == "queued"
        assert calls[0][0] == "SA" and calls[0][1]["labels"]["alertname"] == "QcloopOodFractionHigh"
        code, body = _post(url, _am_payload("resolved"), ok)
        assert code == 202 and body["results"][0]["outcome"] == "resolved" and len(calls) == 1
        code, body = _post(url, _am_payload(view=None), ok)
        assert body["results"][0]["outcome"].startswith("ignored") and len(calls) == 1
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(url, timeout=10)
        assert exc.value.code == 405
        # a body declared over the limit is refused from its header, before it is read
        big = {**ok, "Content-Length": str((1 << 20) + 1)}
        assert _post(url, b"{}", big)[0] == 413
    finally:
        hook.close()
    # without a dispatcher the route names the option that turns it on
    off = HttpEndpoint(monitor_app(lambda: {"status": "ok"}, None)).start()
    try:
        code, body = _post(off.url + "/alertmanager", _am_payload(), {})
        assert code == 404 and "--webhook" in body["error"]
    finally:
        off.close()
    with pytest.raises(ValueError, match="status"):
        parse_payload(b'{"alerts": [{"labels": {}, "status": "odd"}]}')


def test_metrics_endpoint_serves_the_monitor_metrics(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    feed_inbox(inbox, tiny_cohort, "LA", {"A"}, 2)
    port = free_port()
    cfg = monitor_cfg(run_copy, http_port=port)
    mon = Monitor(inbox, out, cfg, champions_of(run_copy), settle_s=0)
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/metrics"
    try:
        # one endpoint: the monitor's /healthz, the exporter's /metrics (no webhook asked for)
        assert mon.service.endpoints == {"healthz": f"{base}/healthz", "metrics": url}
        mon.step()
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read().decode()
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as r:
            health = json.loads(r.read())
    finally:
        mon.close()
    assert health == {
        "status": "ok",
        "intake": "running",
        "views": ["LA", "SA"],
        "skipped_files": 0,
    }
    with pytest.raises(urllib.error.URLError):  # closed with the service
        urllib.request.urlopen(url, timeout=2)
    assert 'qcloop_cases_scored_total{view="LA"} 2.0' in body
    assert 'qcloop_pdc_reference_median{view="SA"}' in body
    assert 'qcloop_window_cases{view="LA"} 2.0' in body
    assert "qcloop_case_latency_seconds_bucket" in body


def test_identity_from_names_and_sidecars(tmp_path: Path) -> None:
    assert read_identity(tmp_path / "011_SA_ED.nii.gz").view == "SA"
    ident = read_identity(tmp_path / "pat7-la-es.nii")
    assert (ident.view, ident.phase) == ("LA", "ES")
    assert read_identity(tmp_path / "x_SA.nii.gz").phase == "unknown"
    (tmp_path / "y.json").write_text(json.dumps({"view": "XX"}))
    with pytest.raises(Exception, match="sidecar field 'view' is 'XX'"):
        read_identity(tmp_path / "y.nii.gz")


def test_inbox_waits_for_files_to_settle(tmp_path: Path) -> None:
    from qcloop.monitor.ops.inbox import InboxWatcher

    now = [0.0]
    w = InboxWatcher(tmp_path, settle_s=1.0, clock=lambda: now[0])
    f = tmp_path / "a_SA_ED.nii.gz"
    f.write_bytes(b"x")
    (tmp_path / ".b_SA_ED.nii.gz.part").write_bytes(b"x")
    assert w.scan() == ([], [])
    now[0] = 0.5
    with open(f, "ab") as fh:  # still being written: the clock starts again
        fh.write(b"more")
    assert w.scan() == ([], [])
    now[0] = 1.2
    assert w.scan() == ([], [])
    now[0] = 1.6
    assert w.scan() == ([f], [])


def test_command_line_needs_one_model_source_and_a_webhook_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from qcloop.monitor.cli.main import cli
    from qcloop.monitor.ops.webhook import WebhookError, webhook_secret

    runner = CliRunner()
    args = ["monitor", "--inbox", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    result = runner.invoke(cli, args)
    assert result.exit_code == 2 and "exactly one of --run RUN or --model" in result.output
    result = runner.invoke(cli, [*args, "--run", str(tmp_path), "--model", "qcloop@champion"])
    assert result.exit_code == 2
    # any registered runtime is accepted; an unknown one is refused with the available ones
    result = runner.invoke(cli, [*args, "--model", "qcloop@champion", "--runtime", "nosuch"])
    assert result.exit_code == 2 and "unknown runtime 'nosuch'" in result.output
    assert "torch" in result.output
    monkeypatch.delenv("QCLOOP_TEST_SECRET", raising=False)
    with pytest.raises(WebhookError, match="QCLOOP_TEST_SECRET"):
        webhook_secret("QCLOOP_TEST_SECRET")
    monkeypatch.setenv("QCLOOP_TEST_SECRET", "  abc \n")
    assert webhook_secret("QCLOOP_TEST_SECRET") == "abc"
    with pytest.raises(WebhookError):
        AlertDispatcher(lambda view, alert: "x", "")


def test_a_torn_last_line_is_cut_off_and_appends_stay_whole(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    log = JsonlLog(path)
    assert log.read() == [{"a": 1}, {"b": 2}]
    log.append({"d": 4})
    assert path.read_text().splitlines() == ['{"a": 1}', '{"b": 2}', '{"d":4}']
    with pytest.raises(ValueError, match="Out of range float"):
        log.append({"x": float("nan")})
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        JsonlLog(path).read()


def test_a_refinement_queued_before_a_crash_is_queued_again(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    refined: list[list[str]] = []

    def fake_refine(window: Path, run: Path, out_run: Path, view: str, cfg: Any) -> dict:
        refined.append(sorted(s.key for s in discover(window)))
        return {"views": {view: {"cases": 1, "flagged": 1}}}

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    (case,) = feed_inbox(inbox, tiny_cohort, "SA", {"B"}, 1)
    # Alertmanager may act on one case; the monitor's own policy never alerts here
    never = {"ood_fraction_limit": 1.0, "median_pdc_shift_limit": 1.0}
    cfg = monitor_cfg(run_copy, refine_on_alert=True, min_cases=1, **never)
    first = Monitor(inbox, out, cfg, champions_of(run_copy, ("SA",)), refine_fn=fake_refine)
    first.process_file(case)
    assert first.receive_alert("SA", {"labels": {"alertname": "QcloopPdcShift"}}) == "queued"
    first.close()  # "crash": the queued refinement never ran
    second = Monitor(inbox, out, cfg, champions_of(run_copy, ("SA",)), refine_fn=fake_refine)
    assert second.views["SA"].pending is not None
    assert second.receive_alert("SA", {"labels": {}}) == "coalesced"
    second.run_pending()
    assert refined == [["000001/SA/ED"]]
    assert JsonlLog(out / "ledger.jsonl").read()[-1]["event"] == "refinement"
    second.close()
    third = Monitor(inbox, out, cfg, champions_of(run_copy, ("SA",)), refine_fn=fake_refine)
    assert third.views["SA"].pending is None and len(refined) == 1
    third.close()


def test_the_monitor_follows_a_champion_promoted_elsewhere(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    (case,) = feed_inbox(inbox, tiny_cohort, "SA", {"A"}, 1)
    registry = FakeRegistry(promote=False)
    mon = Monitor(
        inbox,
        out,
        monitor_cfg(run_copy),
        champions_of(run_copy, ("SA",)),
        registry=registry,
        gate_fn=registry.gate,
        reload_poll_s=3600,
    )
    mon.process_file(case)
    registry.versions["SA"], registry.runs["SA"] = "7", run_copy  # `qcloop models promote`
    mon.check_champions()  # not due yet: nothing changes
    assert mon.views["SA"].champion.version == "1"
    mon.check_champions(force=True)
    assert mon.views["SA"].champion.version == "7" and len(mon.views["SA"].window) == 0
    event = JsonlLog(out / "ledger.jsonl").read()[-1]
    assert event["event"] == "window_reset" and event["previous"]["version"] == "1"
    mon.close()
    restarted = Monitor(
        inbox, out, monitor_cfg(run_copy), {"SA": registry.resolve("qcloop@champion")["SA"]}
    )
    assert len(restarted.views["SA"].window) == 0  # the reset survives a restart
    restarted.close()
