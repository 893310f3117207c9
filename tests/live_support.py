"""Shared by the tests that take a run live: one pass of ``qcloop monitor`` over an inbox, and
one request to ``qcloop serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.monitor_support import champions_of, feed_inbox, monitor_cfg, read_records
from tests.test_serve import KEY, LiveServer, check_segmentation, cohort_file, post, serve_cfg


def monitor_once(run: Path, cohort: Path, view: str, root: Path, n: int) -> list[dict[str, Any]]:
    """The monitor over an inbox of ``n`` cases of ``view`` (every vendor), once; its records
    (every one checked free of errors)."""
    from qcloop.monitor.ops.monitor import Monitor

    inbox, out = root / "inbox", root / "monitor"
    fed = feed_inbox(inbox, cohort, view, {"A", "B", "C"}, n)
    mon = Monitor(inbox, out, monitor_cfg(run), champions_of(run, (view,)), settle_s=0)
    try:
        assert mon.step() == len(fed)
    finally:
        mon.close()
    records = read_records(out)
    assert len(records) == len(fed) and all("error" not in r for r in records)
    return records


def serve_one(run: Path, cohort: Path, view: str, runtime: str) -> dict[str, Any]:
    """The HTTP answer of ``qcloop serve`` (``runtime``) for one case of ``view``, checked."""
    from qcloop.deploy.serve.app import create_app
    from qcloop.deploy.serve.model_source import RunSource

    source = RunSource(run)
    cfg = serve_cfg(run, runtime=runtime)
    server = LiveServer(create_app(source, cfg, api_key=KEY, initial=source.load(runtime)))
    try:
        with server.client() as client:
            path = cohort_file(cohort, view)
            response = post(client, path.read_bytes(), path.name)
            assert response.status_code == 200, response.text
            body = response.json()
            check_segmentation(body, path)
            assert body["record"]["runtime"]["name"] == runtime
            return body
    finally:
        server.stop()
