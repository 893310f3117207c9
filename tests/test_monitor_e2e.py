"""End to end with real servers on 127.0.0.1: `qcloop monitor` scores shifted phantoms, a real
Prometheus scrapes it and fires the deploy/ alert rule, a real Alertmanager posts to the
monitor's webhook, the monitor refines, and a new model version appears in the MLflow registry
(the default SQLite URI in the working folder)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from qcloop.monitor.data import discover
from tests.prom_servers import (
    ALERTMANAGER_BIN,
    PROMETHEUS_BIN,
    ServerProcess,
    alertmanager_config,
    free_port,
    http_get,
    prometheus_config,
    prometheus_query,
    start_alertmanager,
    start_prometheus,
    wait_for,
)

pytestmark = pytest.mark.slow

SECRET_ENV = "QCLOOP_E2E_WEBHOOK_SECRET"
SECRET = "e2e-shared-secret-7f3a"


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Every process a test starts; all process groups are killed at the end."""
    started: list[ServerProcess] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def _ledger(out: Path) -> list[dict[str, Any]]:
    path = out / "ledger.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_prometheus_alert_through_alertmanager_refines_and_registers(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    for binary in (PROMETHEUS_BIN, ALERTMANAGER_BIN):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} is not installed (.ci/run installs the Debian package)")
    work = tmp_path / "work"  # the monitor's working folder: mlflow.db lands here
    work.mkdir()
    run = work / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "LA")  # a short-axis deployment: half the start-up work
    inbox, out = work / "inbox", work / "out"
    http_port, prom_port, am_port = (free_port() for _ in range(3))
    # The monitor's own policy is switched off (limits it cannot reach), so the only alert that
    # can start refinement is the one Prometheus raises from the deploy/ rules.
    config = {
        "monitoring": {
            "window": 50,
            "min_cases": 10,
            "drift_rule": "fixed",
            "ood_fraction_limit": 1.0,
            "median_pdc_shift_limit": 1.0,
            "refine_on_alert": True,
            "http_port": http_port,
            "webhook_secret_env": SECRET_ENV,
        },
        "registry": {"promotion": "auto", "dice_margin": 0.05},
        "refinement": {
            "refiner": {"name": "alpha", "params": {"max_slices_per_epoch": 8}},
            "k_semi": 1,
        },
    }
    (work / "monitor.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({SECRET_ENV: SECRET, "QCLOOP_MODEL_CACHE": str(work / "model-cache")})
    monitor = ServerProcess(
        "qcloop monitor",
        [
            sys.executable,
            "-m",
            "qcloop.monitor",
            "monitor",
            "--run",
            str(run),
            "--inbox",
            str(inbox),
            "--out",
            str(out),
            "--config",
            str(work / "monitor.yaml"),
            "--webhook",  # on the same port as /metrics
            "--poll-s",
            "0.5",
            "--settle-s",
            "0.5",
            "--threads",
            "1",  # Prometheus, Alertmanager and pytest share the cores
        ],
        work / "monitor.log",
        cwd=work,
        env=env,
    )
    servers.append(monitor)
    secret_file = work / "webhook-secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    am_cfg = alertmanager_config(work, f"http://127.0.0.1:{http_port}/alertmanager", secret_file)
    alertmanager = start_alertmanager(work, am_cfg, am_port)
    servers.append(alertmanager)
    prometheus = start_prometheus(work, prometheus_config(work, http_port, am_port), prom_port)
    servers.append(prometheus)
    everyone = [monitor, alertmanager, prometheus]
    t0 = time.monotonic()

    wait_for(
        "Alertmanager ready",
        lambda: http_get(f"http://127.0.0.1:{am_port}/-/ready")[0] == 200,
        60,
        everyone,
    )
    wait_for(
        "Prometheus ready",
        lambda: http_get(f"http://127.0.0.1:{prom_port}/-/ready")[0] == 200,
        60,
        everyone,
    )
    wait_for(
        "the monitor's /metrics",
        lambda: http_get(f"http://127.0.0.1:{http_port}/metrics")[0] == 200,
        120,
        everyone,
    )

    # shifted phantoms: vendors B and C, never seen in training; written, then renamed in
    shifted = [s for s in discover(tiny_cohort, views=["SA"]) if s.vendor in ("B", "C")][:12]
    assert len(shifted) == 12  # min_cases 10: the rule can fire, the window stays small
    inbox.mkdir(exist_ok=True)
    for src in shifted:
        part = inbox / f".{src.image_path.name}.part"
        shutil.copy2(src.image_path, part)
        part.rename(inbox / src.image_path.name)

    scraped = wait_for(
        "Prometheus to scrape the scored cases",
        lambda: [
            r
            for r in prometheus_query(prom_port, 'qcloop_window_cases{job="qcloop-monitor"}')
            if r["metric"].get("view") == "SA" and float(r["value"][1]) >= 10
        ],
        120,
        everyone,
    )
    assert scraped[0]["metric"]["instance"] == f"127.0.0.1:{http_port}"
    firing = wait_for(
        "QcloopOodFractionHigh to fire",
        lambda: prometheus_query(
            prom_port, 'ALERTS{alertname="QcloopOodFractionHigh", alertstate="firing"}'
        ),
        90,
        everyone,
    )
    assert firing[0]["metric"]["view"] == "SA"
    fraction = prometheus_query(prom_port, 'qcloop_ood_fraction{view="SA"}')
    assert fraction and float(fraction[0]["value"][1]) > 0.3
    scored = prometheus_query(prom_port, "sum(qcloop_cases_scored_total)")
    assert scored and float(scored[0]["value"][1]) >= 10

    def finished() -> dict[str, Any] | None:
        for event in _ledger(out):
            if event["event"] == "refinement_failed":
                raise AssertionError(f"refinement failed: {event}\n{monitor.log_tail()}")
            if event["event"] == "refinement":
                return event
        return None

    refinement = wait_for("the refinement", finished, 240, everyone, interval=1.0)
    alerts = [e for e in _ledger(out) if e["event"] == "alert"]
    assert alerts and alerts[0]["source"] == "alertmanager"
    # both drift rules fire on this window (OoD fraction and pDC shift); whichever Alertmanager
    # delivered first started the refinement, and the other was coalesced
    assert alerts[0]["alert"]["labels"]["alertname"] in ("QcloopOodFractionHigh", "QcloopPdcShift")
    assert refinement["source"] == "alertmanager" and refinement["window_cases"] >= 10
    registered = refinement["registered"]
    assert registered["name"] == "qcloop-SA" and int(registered["version"]) >= 2
    assert registered["gate"] is not None and "passed" in registered["gate"]

    # the new version is in the registry of the working folder, with its lineage
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    versions = {str(mv.version): mv for mv in client.search_model_versions("name = 'qcloop-SA'")}
    new = versions[registered["version"]]
    assert new.tags["qcloop.alert_source"] == "alertmanager"
    assert new.tags["qcloop.window_id"] == refinement["window_id"]
    assert new.tags["qcloop.parent_version"] == refinement["parent"]["version"]
    aliases = dict(client.get_registered_model("qcloop-SA").aliases)
    alias = "champion" if refinement["promoted"] else "challenger"
    assert str(aliases.get(alias)) == registered["version"], aliases
    # Prometheus sees the alert and the refinement counted by the monitor's metrics
    wait_for(
        "the refinement in Prometheus",
        lambda: (
            prometheus_query(prom_port, 'qcloop_refinements_total{view="SA"} >= 1')
            and prometheus_query(
                prom_port, 'qcloop_drift_alerts_total{view="SA", source="alertmanager"} >= 1'
            )
        ),
        30,
        everyone,
    )
    first = alerts[0]["alert"]["labels"]["alertname"]
    assert f"alertmanager: {first} firing for SA: queued" in monitor.log_tail(20000)
    assert time.monotonic() - t0 < 300
