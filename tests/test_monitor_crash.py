"""Exactly once under ``kill -9``: a real monitor process is killed by SIGKILL at each named
crash point (``monitor/core/crash_points.py``), then a fresh one runs on the same folders. No
case may be lost or scored twice, no sidecar may be left in the inbox without its image, and a
rejected file ends in ``rejected/`` with its sidecar."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qcloop.monitor.core.crash_points import POINTS
from qcloop.monitor.data import discover
from qcloop.monitor.ops.ledger import JsonlLog

pytestmark = pytest.mark.slow

#: One monitor pass over the inbox, in a process of its own (what ``qcloop monitor --once``
#: does, without the model registry the command line sets up).
PASS = """
import sys
from pathlib import Path

import torch

from qcloop.monitor import ModelRef
from qcloop.monitor.method.run_folder import load_run_config
from qcloop.monitor.ops.monitor import Monitor

torch.set_num_threads(1)
run, inbox, out = (Path(a) for a in sys.argv[1:4])
cfg = load_run_config(run)
cfg = cfg.model_copy(update={"monitoring": cfg.monitoring.model_copy(update={"http_port": 0})})
with Monitor(inbox, out, cfg, {"SA": ModelRef("qcloop-SA", "SA", "1", run)}, settle_s=0) as mon:
    mon.step()
"""


def _pass(run: Path, inbox: Path, out: Path, crash_at: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "QCLOOP_CRASH_AT"}
    if crash_at:
        env["QCLOOP_CRASH_AT"] = crash_at
    argv = [sys.executable, "-c", PASS, str(run), str(inbox), str(out)]
    return subprocess.run(argv, env=env, capture_output=True, check=False).returncode


def _fill(inbox: Path, cohort: Path) -> dict[str, Path]:
    """Three SA cases named without view or phase, each described by a sidecar, and one bad
    file with a sidecar (a truncated image). Returns the good cases' sources by name."""
    inbox.mkdir(parents=True)
    good = {}
    for i, src in enumerate([s for s in discover(cohort, views=["SA"])][:3]):
        name = f"scan{i}.nii.gz"
        shutil.copy2(src.image_path, inbox / name)
        (inbox / f"scan{i}.json").write_text(json.dumps({"view": "SA", "phase": src.phase}))
        good[name] = src.image_path
    (inbox / "bad.nii.gz").write_bytes(next(iter(good.values())).read_bytes()[:3000])
    (inbox / "bad.json").write_text(json.dumps({"view": "SA", "phase": "ED"}))
    return good


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_any_point_loses_nothing_and_repeats_nothing(
    point: str, tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    good = _fill(inbox, tiny_cohort)
    assert _pass(tiny_run, inbox, out, point) == -signal.SIGKILL
    assert _pass(tiny_run, inbox, out, None) == 0
    assert sorted(p.name for p in inbox.iterdir()) == []  # nothing left, no orphan sidecar

    records = JsonlLog(out / "records.jsonl").read()
    assert sorted(r["source_file"] for r in records) == sorted(good)
    cases = [e for e in JsonlLog(out / "ledger.jsonl").read() if e["event"] == "case"]
    assert sorted(e["sha256"] for e in cases) == sorted(r["sha256"] for r in records)
    assert len({e["seq"] for e in cases}) == len(good)
    for rec in records:
        image = out / rec["processed"]
        assert image.read_bytes() == good[rec["source_file"]].read_bytes()
        sidecar = image.with_name(image.name.replace(".nii.gz", ".source.json"))
        assert json.loads(sidecar.read_text())["view"] == "SA"
    rejected = sorted(p.name for p in (out / "rejected").iterdir())
    assert "bad.nii.gz" in rejected and "bad.json" in rejected
