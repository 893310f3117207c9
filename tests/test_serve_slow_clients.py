"""``qcloop serve`` against clients that send their body slowly: the body is read within
``serving.upload_timeout_s`` (408 past it, counted) and before a processing slot is taken, so
slow clients cannot hold the slots that real requests need."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from qcloop.deploy.serve.app import create_app
from qcloop.deploy.serve.model_source import RunSource
from tests.test_serve import AUTH, KEY, LiveServer, cohort_file, metric_total, post, serve_cfg


def _slow_client(url: str, answers: list[bytes]) -> None:
    """Send the headers and a few bytes of a declared 100 kB multipart body, then stall."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        head = (
            "POST /v1/segment HTTP/1.1\r\n"
            f"Host: {parts.netloc}\r\nAuthorization: {AUTH['Authorization']}\r\n"
            "Connection: close\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 100000\r\n\r\n"
            "--xyz\r\n"
        )
        sock.sendall(head.encode())
        answer = b""
        while chunk := sock.recv(4096):  # the whole answer: the server closes the connection
            answer += chunk
        answers.append(answer)


def test_slow_uploads_time_out_and_never_hold_a_slot(tiny_run: Path, tiny_cohort: Path) -> None:
    source = RunSource(tiny_run)
    cfg = serve_cfg(tiny_run, upload_timeout_s=2.0, max_concurrency=1, queue_size=0)
    server = LiveServer(create_app(source, cfg, api_key=KEY, initial=source.load("torch")))
    answers: list[bytes] = []
    try:
        slow = [threading.Thread(target=_slow_client, args=(server.url, answers)) for _ in range(3)]
        for t in slow:
            t.start()
        time.sleep(0.5)  # three clients are stalling in their uploads: one slot, no queue
        with server.client() as client:
            path = cohort_file(tiny_cohort, "SA")
            response = post(client, path.read_bytes(), path.name)
            assert response.status_code == 200, response.text
            for t in slow:
                t.join(timeout=30)
            assert len(answers) == 3 and all(a.startswith(b"HTTP/1.1 408") for a in answers)
            assert all(b"upload_timeout_s" in a for a in answers)
            text = client.get("/metrics").text
            errors = metric_total(text, "qcloop_case_errors_total")
            assert errors >= 3 and 'stage="upload_timeout"' in text
    finally:
        server.stop()
