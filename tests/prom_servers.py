"""Helpers for tests that run real servers on 127.0.0.1: free ports, processes in their own
process group (always killed as a group), readiness polling, and Prometheus/Alertmanager
configurations generated from the deploy/ files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_BIN = "prometheus"
ALERTMANAGER_BIN = "prometheus-alertmanager"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A subprocess in its own session (process group), logging to a file."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            list(args),
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the process's output."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):  # children may outlive the leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=timeout)
        self._log.close()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 when the server does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float,
    processes: Sequence[ServerProcess] = (),
    interval: float = 0.5,
) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the processes' logs when
    ``timeout`` passes or one of them exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        dead = [p for p in processes if not p.alive()]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in processes)
            why = f"{', '.join(p.name for p in dead)} exited" if dead else f"{timeout:.0f} s passed"
            raise AssertionError(f"waiting for {what}: {why}\n{logs}")
        time.sleep(interval)


def prometheus_query(port: int, query: str) -> list[dict[str, Any]]:
    """Result vector of an instant query over Prometheus' HTTP API (empty on any failure)."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    status, body = http_get(url)
    if status != 200:
        return []
    data = json.loads(body)
    return list(data.get("data", {}).get("result", [])) if data.get("status") == "success" else []


def fast_rules(folder: Path, for_duration: str = "1s") -> Path:
    """deploy/'s rules file with every ``for`` shortened (expressions and limits unchanged)."""
    rules = yaml.safe_load((DEPLOY / "prometheus/rules/qcloop.rules.yml").read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = for_duration
    path = folder / "qcloop.rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def prometheus_config(folder: Path, metrics_port: int, alertmanager_port: int) -> Path:
    """deploy/'s prometheus.yml pointed at the given ports, scraping and evaluating every 1 s."""
    cfg = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    cfg["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    cfg["rule_files"] = [str(fast_rules(folder))]
    cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [
        f"127.0.0.1:{alertmanager_port}"
    ]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "qcloop-monitor"]
    job["scrape_interval"] = "1s"
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{metrics_port}"]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def alertmanager_config(folder: Path, webhook_url: str, secret_file: Path) -> Path:
    """deploy/'s alertmanager.yml posting to ``webhook_url`` with the secret in
    ``secret_file``, grouping and repeating within seconds."""
    cfg = yaml.safe_load((DEPLOY / "alertmanager/alertmanager.yml").read_text())
    cfg["route"].update({"group_wait": "1s", "group_interval": "1s"})
    for route in cfg["route"].get("routes", []):
        route.update({"group_wait": "1s"})
    (receiver,) = [r for r in cfg["receivers"] if r["name"] == "qcloop-monitor"]
    hook = receiver["webhook_configs"][0]
    hook["url"] = webhook_url
    hook["http_config"]["authorization"]["credentials_file"] = str(secret_file)
    path = folder / "alertmanager.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start_prometheus(folder: Path, config: Path, port: int) -> ServerProcess:
    """A real Prometheus on 127.0.0.1:``port`` with its storage in ``folder``."""
    binary = shutil.which(PROMETHEUS_BIN)
    assert binary, f"{PROMETHEUS_BIN} not installed"
    return ServerProcess(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            "--log.level=info",
        ],
        folder / "prometheus.log",
    )


def start_alertmanager(folder: Path, config: Path, port: int) -> ServerProcess:
    """A real Alertmanager on 127.0.0.1:``port``, clustering off, storage in ``folder``."""
    binary = shutil.which(ALERTMANAGER_BIN)
    assert binary, f"{ALERTMANAGER_BIN} not installed"
    return ServerProcess(
        "alertmanager",
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={folder / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            "--log.level=debug",
        ],
        folder / "alertmanager.log",
    )
