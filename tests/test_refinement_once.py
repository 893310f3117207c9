"""A window is refined once: a repeated alert, or a restart after the refinement or its
registration, finds what was already made (``monitor/ops/refinement_job.py``) instead of
refining and registering again; Alertmanager's repeats without new cases are not acted on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.events import WindowStats
from qcloop.monitor.core.interfaces import ModelRef
from qcloop.monitor.core.plugin_manager import get_plugin_manager
from qcloop.monitor.ops.alerts import AlertPolicy
from qcloop.monitor.ops.drift import DriftLimits
from qcloop.monitor.ops.ledger import Ledger, WindowCase
from qcloop.monitor.ops.refinement_job import RefinementJob, window_key


@pytest.fixture
def champion(tmp_path: Path) -> ModelRef:
    """Version 3 of the SA model; its run folder holds a configuration only."""
    from qcloop.monitor.core.config import save_config

    run = tmp_path / "champion"
    run.mkdir()
    save_config(QcloopConfig(), run / "config.yaml")
    return ModelRef("qcloop-SA", "SA", "3", run)


def _window(out: Path, n: int = 4) -> list[WindowCase]:
    cases = []
    for seq in range(11, 11 + n):
        rel = f"processed/SA/{seq:06d}/{seq:06d}_SA_ED.nii.gz"
        (out / rel).parent.mkdir(parents=True)
        (out / rel).write_bytes(b"image")
        cases.append(WindowCase(seq, f"case{seq}", "ED", "C", rel, seq % 2 == 0, 0.5))
    return cases


class Calls:
    """A refiner that writes a complete run folder, and a gate that fails as told."""

    def __init__(self, gate_failures: int = 0) -> None:
        self.refined: list[Path] = []
        self.gated: list[Path] = []
        self.gate_failures = gate_failures

    def refine(self, window: Path, run: Path, out: Path, view: str, cfg: QcloopConfig) -> dict:
        self.refined.append(out)
        out.mkdir(parents=True)
        info = {"kind": "refined", "views": {view: {"cases": 4, "flagged": 2}}}
        (out / "run.json").write_text(json.dumps(info))
        return info

    def gate(self, registry: Any, run: Path, champions: dict, cfg: Any, **kw: Any) -> dict:
        self.gated.append(run)
        if len(self.gated) <= self.gate_failures:
            raise ConnectionError("the registry went away")
        return {"SA": {"name": "qcloop-SA", "version": "4", "gate": None, "promoted": False}}


def _job(out: Path, calls: Calls, ledger: Ledger | None = None) -> RefinementJob:
    return RefinementJob(
        out, ledger or Ledger(out), QcloopConfig(), registry=object(), refinement=None,
        refine_fn=calls.refine, gate_fn=calls.gate, pm=get_plugin_manager(),
    )  # fmt: skip


def test_the_window_key_names_the_view_model_and_cases(tmp_path: Path, champion: ModelRef) -> None:
    cases = _window(tmp_path / "out")
    assert window_key("SA", champion, cases) == "SA-v3-000011-000014"
    assert window_key("SA", champion, cases[:3]) != window_key("SA", champion, cases)


def test_a_window_is_refined_and_registered_once(tmp_path: Path, champion: ModelRef) -> None:
    out = tmp_path / "out"
    cases, calls = _window(out), Calls(gate_failures=1)
    alert = {"source": "alertmanager", "reasons": ["x"]}
    job = _job(out, calls)
    failed = job.run("SA", alert, cases, champion, lambda view: None)
    assert failed is not None and failed["event"] == "refinement_failed"
    assert len(calls.refined) == 1 and len(calls.gated) == 1

    # a restart (a fresh ledger read from disk) retries: the refined run is reused, not redone
    job = _job(out, calls)
    done = job.run("SA", alert, cases, champion, lambda view: None)
    assert done is not None and done["event"] == "refinement"
    assert len(calls.refined) == 1 and len(calls.gated) == 2
    assert done["refined_run"] == str(out / "runs" / "SA-v3-000011-000014-refined")

    # the same window again (Alertmanager's repeat, a restart): nothing runs
    for same in (_job(out, calls), job):
        again = same.run("SA", alert, cases, champion, lambda view: None)
        assert again is not None and again["event"] == "refinement_skipped"
        assert "already refined" in again["reason"]
    assert len(calls.refined) == 1 and len(calls.gated) == 2
    # a window that grew is new evidence: refined
    assert job.run("SA", alert, _window(tmp_path / "more", 6), champion, lambda v: None)


@pytest.mark.parametrize(
    ("window_n", "new_cases", "outcome"),
    [(3, 0, "too few cases"), (12, 2, "no new evidence"), (12, 10, "queued")],
)
def test_alertmanager_alerts_need_evidence(
    tmp_path: Path, window_n: int, new_cases: int, outcome: str
) -> None:
    policy = AlertPolicy(
        DriftLimits(min_cases=10, ood_fraction_limit=0.3, median_pdc_shift_limit=0.1),
        Ledger(tmp_path), cooldown_s=0, refine_on_alert=True, pm=get_plugin_manager(),
    )  # fmt: skip
    from qcloop.monitor.ops.ledger import ViewHistory

    policy.restore("SA", ViewHistory())
    stats = WindowStats(window_n, 0.5, 0.6)
    am = {"labels": {"alertname": "QcloopDrift"}}
    if new_cases < 10 and window_n >= 10:  # an alert was acted on before
        assert policy.receive("SA", am, stats, 0.8, {}) == "queued"
        policy.done("SA")
        for _ in range(new_cases):
            policy.after_case("SA", WindowStats(window_n, 0.0, 0.8), 0.8, {})
    assert policy.receive("SA", am, stats, 0.8, {}).startswith(outcome)
