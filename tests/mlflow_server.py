"""A real MLflow tracking server for tests, on 127.0.0.1 and a free port.

``mlflow server`` runs with a SQLite backend and a served artifact store in a temporary folder,
one worker, in its own process group (stopped with the group at the end of the session).
Import the ``mlflow_server`` fixture into a test module to use it::

    from tests.mlflow_server import mlflow_server  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Seconds to wait for /health; a loaded 2-core machine took ~25 s.
START_TIMEOUT_S = 120.0


class MlflowServerUnavailable(RuntimeError):
    """``mlflow server`` could not be started here (the reason is the message)."""


@dataclass
class MlflowServer:
    """A running server: its tracking URI, folder and process."""

    uri: str
    root: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, n: int = 2000) -> str:
        """The end of the server's output (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mlflow_server(root: Path, timeout_s: float = START_TIMEOUT_S) -> MlflowServer:
    """Start ``mlflow server`` storing everything under ``root``; return once /health answers.

    Raises:
        MlflowServerUnavailable: mlflow is not installed, the process exited, or /health did not
            answer within ``timeout_s`` (the server is stopped first).
    """
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise MlflowServerUnavailable(f"mlflow is not installed ({exc})") from exc
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = root / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root.resolve() / 'db.sqlite'}",
        "--artifacts-destination",
        str(root.resolve() / "artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = MlflowServer(f"http://127.0.0.1:{port}", root, process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MlflowServerUnavailable(
                f"mlflow server exited with status {process.returncode}: {server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    stop_mlflow_server(server)
    raise MlflowServerUnavailable(
        f"mlflow server did not answer /health within {timeout_s:.0f} s: {server.log_tail()}"
    )


def stop_mlflow_server(server: MlflowServer, timeout_s: float = 5.0) -> None:
    """Stop the server's whole process group (TERM, then KILL)."""
    if server.process.poll() is not None:
        return
    pgid = os.getpgid(server.process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        server.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        server.process.wait(timeout=timeout_s)
    # workers left behind in the group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server for the session; skipped only when it cannot start."""
    try:
        server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    except MlflowServerUnavailable as exc:
        pytest.skip(f"no MLflow tracking server: {exc}")
    try:
        yield server
    finally:
        stop_mlflow_server(server)
