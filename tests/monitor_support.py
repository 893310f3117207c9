"""Shared by the monitor tests: one torch thread, a copy of the session run, the run's
configuration with the monitor's endpoint off, champions, feeding an inbox, reading records
and the exporter's samples."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from qcloop.monitor import ModelRef
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.data import discover
from qcloop.monitor.method.run_folder import load_run_config
from qcloop.monitor.ops.ledger import JsonlLog
from qcloop.monitor.ops.monitor import Monitor
from qcloop.plugins.prometheus.exporter import service_metrics


def monitor_cfg(run: Path, **monitoring: Any) -> QcloopConfig:
    """The run's configuration; the monitor's own /metrics endpoint off unless a port is set."""
    base = load_run_config(run)
    update = {"refine_on_alert": False, "http_port": 0, **monitoring}
    return base.model_copy(update={"monitoring": base.monitoring.model_copy(update=update)})


def champions_of(run: Path, views: tuple[str, ...] = ("SA", "LA")) -> dict[str, ModelRef]:
    return {v: ModelRef(f"qcloop-{v}", v, "1", run) for v in views}


def exporter_samples(mon: Monitor) -> dict[tuple[str, tuple], float]:
    """The monitor's metrics, as the exporter keeps them for its service."""
    metrics = service_metrics(mon.service.id)
    assert metrics is not None, "the Prometheus exporter did not start for the monitor"
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def feed_inbox(inbox: Path, cohort: Path, view: str, vendors: set[str], limit: int) -> list[Path]:
    inbox.mkdir(parents=True, exist_ok=True)
    taken = []
    for src in discover(cohort, views=[view]):
        if src.vendor in vendors and len(taken) < limit:
            taken.append(Path(shutil.copy2(src.image_path, inbox / src.image_path.name)))
    return taken


def read_records(out: Path) -> list[dict[str, Any]]:
    return JsonlLog(out / "records.jsonl").read()


class FakeRegistry:
    """Stands in for the model registry and the promotion gate in fast tests: records the
    gate's calls, promotes on request; follows ``qcloop@champion``."""

    def __init__(self, promote: bool) -> None:
        self.promote = promote
        self.calls: list[dict[str, Any]] = []
        self.versions = {"SA": "1", "LA": "1"}
        self.runs: dict[str, Path] = {}

    def gate(
        self,
        registry: Any,
        refined_run: Path,
        champions: dict[str, ModelRef],
        cfg: QcloopConfig,
        *,
        window_dir: Path,
        tags: dict[str, str],
    ) -> dict[str, dict[str, Any]]:
        """The signature of ``promotion.register_and_gate``."""
        assert registry is self
        ((view, champion),) = champions.items()
        self.calls.append({"run": refined_run, "window": window_dir, "tags": tags})
        version = str(int(self.versions[view]) + 1)
        self.runs[view] = refined_run
        if self.promote:
            self.versions[view] = version
        gate = {"passed": self.promote}
        return {
            view: {
                "name": champion.name,
                "version": version,
                "gate": gate,
                "promoted": self.promote,
            }
        }

    def alias_versions(self, spec: str) -> dict[str, str]:
        assert spec == "qcloop@champion", spec
        return dict(self.versions)

    def resolve(self, spec: str) -> dict[str, ModelRef]:
        assert spec == "qcloop@champion", spec
        return {
            v: ModelRef(f"qcloop-{v}", v, self.versions[v], self.runs[v])
            for v in self.versions
            if v in self.runs
        }
