"""Service benchmark: ``qcloop serve`` latency, throughput, errors and peak memory.

The server runs in its own process (``python -m qcloop.monitor serve``, the deploy plugin's command) on 127.0.0.1, exactly as
a user starts it; the client sends one short-axis volume (a 10-slice phantom by default) from
``concurrency`` threads at once and times each request end to end (upload, queue, scoring,
encoding the mask, download). The server's peak resident memory is read from
``/proc/PID/status`` (``VmHWM``).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["phantom_sa_volume", "read_memory_mb", "run_serve_benchmark"]

READY_TIMEOUT_S = 180.0


def phantom_sa_volume(slices: int = 10, seed: int = 0) -> tuple[bytes, tuple[int, ...]]:
    """A gzipped NIfTI short-axis phantom volume of ``slices`` slices (vendor A, ED) and its
    shape."""
    from qcloop.monitor.phantoms import render_subject, sample_anatomy, sample_chain
    from qcloop.monitor.phantoms.nifti import nifti_gz_bytes
    from qcloop.monitor.phantoms.views import GridSpec, sample_geometry

    rng = np.random.default_rng(seed)
    anatomy = sample_anatomy(rng, "NOR")
    chain = sample_chain(rng, "A")
    geometry = sample_geometry(rng, "A", anatomy, GridSpec(slices=(slices, slices)))
    images = render_subject(anatomy, geometry, chain)
    image = images.images["SA", "ED"].astype(np.float32)
    return nifti_gz_bytes(image, images.affines["SA"]), tuple(int(n) for n in image.shape)


def _volume_from_data(data: Path) -> tuple[bytes, tuple[int, ...], str]:
    import nibabel as nib

    files = sorted(p for p in data.rglob("*_SA_ED.nii.gz"))
    if not files:
        raise FileNotFoundError(f"{data}: no *_SA_ED.nii.gz image")
    shape = tuple(int(n) for n in nib.load(files[0]).shape)
    return files[0].read_bytes(), shape, str(files[0])


def read_memory_mb(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak) of process ``pid`` in MiB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024.0
    return {"rss_mb": out.get("VmRSS", 0.0), "peak_rss_mb": out.get("VmHWM", 0.0)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Server:
    """``qcloop serve`` in a child process (own process group), stopped on exit."""

    def __init__(
        self, run: Path, runtime: str, config: Path | None, key: str, log_path: Path
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable,
            "-m",
            "qcloop.monitor",
            "--log-level",
            "WARNING",
            "serve",
            "--run",
            str(run),
            "--runtime",
            runtime,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        if config is not None:
            argv += ["--config", str(config)]
        env = {**os.environ, "QCLOOP_API_KEY": key}
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        import httpx

        start = time.perf_counter()
        while time.perf_counter() - start < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"qcloop serve exited with status {self.process.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-3000:]
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"qcloop serve was not ready after {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()


def _level(
    url: str, key: str, payload: bytes, filename: str, concurrency: int, requests: int
) -> dict[str, Any]:
    """Send ``requests`` requests from ``concurrency`` threads; latency and outcome of each."""
    import httpx

    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    headers = {"Authorization": f"Bearer {key}"}

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                t0 = time.perf_counter()
                try:
                    response = client.post(
                        "/v1/segment", headers=headers, files={"file": (filename, payload)}
                    )
                    status = response.status_code
                    if status == 200:
                        response.json()
                except httpx.HTTPError:
                    status = -1
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)
                    statuses.append(status)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [lat for lat, s in zip(latencies, statuses, strict=True) if s == 200]
    ms = np.asarray(ok, dtype=np.float64) * 1000.0
    return {
        "concurrency": concurrency,
        "requests": len(statuses),
        "ok": len(ok),
        "errors": sum(1 for s in statuses if s != 200),
        "rejected_429": sum(1 for s in statuses if s == 429),
        "p50_ms": float(np.percentile(ms, 50)) if ms.size else None,
        "p99_ms": float(np.percentile(ms, 99)) if ms.size else None,
        "mean_ms": float(ms.mean()) if ms.size else None,
        "throughput_rps": len(ok) / wall if wall > 0 else 0.0,
        "wall_s": wall,
    }


def run_serve_benchmark(
    run: str | Path,
    *,
    requests: int = 40,
    concurrency: Sequence[int] = (1, 8),
    runtime: str | None = None,
    data: str | Path | None = None,
    config: str | Path | None = None,
    slices: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Start ``qcloop serve --run RUN`` and measure it at each concurrency level.

    ``runtime`` ``None`` picks ``onnxruntime`` when ``RUN/onnx`` holds an export, else
    ``torch``. Each level is preceded by ``level`` warm-up requests that are not timed.

    Returns:
        The figures: per level p50/p99/mean latency (ms), throughput (requests/s), error and
        429 counts; the server's start time and current/peak RSS (MiB); the machine's load.
    """
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}: not a qcloop run folder (no config.yaml)")
    if runtime is None:
        runtime = "onnxruntime" if (run / "onnx" / "manifest.json").is_file() else "torch"
    if data is not None:
        payload, shape, origin = _volume_from_data(Path(data))
    else:
        payload, shape = phantom_sa_volume(slices, seed)
        origin = f"phantom (seed {seed}, vendor A, ED)"
    key = secrets.token_urlsafe(32)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="qcloop-bench-serve-") as tmp:
        server = _Server(run, runtime, Path(config) if config else None, key, Path(tmp) / "log")
        try:
            ready_s = server.wait_ready()
            levels = []
            for c in concurrency:
                _level(server.url, key, payload, "bench_SA_ED.nii.gz", c, c)  # warm-up
                levels.append(_level(server.url, key, payload, "bench_SA_ED.nii.gz", c, requests))
            memory = read_memory_mb(server.process.pid)
            import httpx

            models = httpx.get(
                f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
            ).json()
        finally:
            server.stop()
    providers = {v: info["providers"] for v, info in models.get("views", {}).items()}
    return {
        "run": str(run.resolve()),
        "runtime": runtime,
        "providers": providers,
        "volume": {"source": origin, "shape": list(shape), "bytes": len(payload)},
        "requests_per_level": requests,
        "levels": levels,
        "server": {"pid": server.process.pid, "ready_s": ready_s, **memory},
        "cpu_count": os.cpu_count(),
        "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0],
        "notes": [
            "latency is end to end from the client: upload, queue, scoring, mask encoding, reply",
            "client and server share the machine's CPUs",
            "errors count every non-200 answer (429 included) and connection failures",
        ],
    }
