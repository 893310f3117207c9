"""``qcloop bench inbox``: what hostile inbox files cost the monitor. Two monitor processes run
one pass over an inbox each: good cases alone, then the same good cases among hostile files (a
gzip bomb whose header declares a huge image, one whose plausible header sits on gigabytes of
compressed zeros, a symlink loop, a truncated file, a name that is not UTF-8, a text file).
Per process: peak RSS (the child's own ``VmHWM``), wall time, cases scored and rejected.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["gzip_bomb", "run_inbox_benchmark", "write_hostile_files"]

#: One MiB of zeros as one gzip member: members concatenate into one stream (RFC 1952).
_MIB_OF_ZEROS = 1 << 20


def gzip_bomb(path: Path, shape: tuple[int, int, int], mib: int) -> Path:
    """A ``.nii.gz`` whose header declares ``shape`` (int16) and whose stream inflates to
    ``mib`` MiB of zeros after it, while the file stays about 1 KiB per MiB."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_zooms((1.0, 1.0, 8.0))
    member = gzip.compress(bytes(_MIB_OF_ZEROS), compresslevel=9)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(header.binaryblock + b"\0" * 4))  # voxels start at 352
        for _ in range(mib):
            fh.write(member)
    return path


def write_hostile_files(inbox: Path, good_case: Path, bomb_mib: int) -> list[str]:
    """The hostile files (``good_case`` lends its bytes to the truncated one); their names
    (bytes that are not UTF-8 as ``\\xNN``)."""
    before = set(inbox.iterdir())
    gzip_bomb(inbox / "bomb_SA_ED.nii.gz", (30000, 30000, 1), 64)
    gzip_bomb(inbox / "deep_SA_ED.nii.gz", (96, 96, 4), bomb_mib)
    os.symlink("loop_SA_ED.nii.gz", inbox / "loop_SA_ED.nii.gz")
    (inbox / "cut_SA_ED.nii.gz").write_bytes(good_case.read_bytes()[:2000])
    (inbox / os.fsdecode(b"odd_\xff_SA_ED.nii.gz")).write_bytes(good_case.read_bytes()[:100])
    (inbox / "notes_SA.txt").write_text("not an image")
    new = set(inbox.iterdir()) - before
    return sorted(os.fsencode(p.name).decode("utf-8", "backslashreplace") for p in new)


def _child(run: str, inbox: str, out: str) -> None:
    """One monitor pass (run in the measured child process); prints its outcome counts."""
    from qcloop.monitor import ModelRef
    from qcloop.monitor.method.run_folder import load_run_config, run_views
    from qcloop.monitor.ops.ledger import JsonlLog
    from qcloop.monitor.ops.monitor import Monitor

    cfg = load_run_config(Path(run))
    cfg = cfg.model_copy(update={"monitoring": cfg.monitoring.model_copy(update={"http_port": 0})})
    champions = {v: ModelRef(f"qcloop-{v}", v, "1", Path(run)) for v in run_views(Path(run))}
    # no figures: the figures measure intake (and matplotlib would weigh on the peak RSS)
    with Monitor(inbox, out, cfg, champions, settle_s=0, figures="none") as mon:
        mon.step()
    events = JsonlLog(Path(out) / "ledger.jsonl").read()
    counts = {k: sum(e["event"] == k for e in events) for k in ("case", "rejected")}
    from qcloop.monitor.benchmarks.loop import emit

    emit(counts)


def _measure(run: Path, inbox: Path, out: Path) -> dict[str, Any]:
    """Run one monitor pass in a child process; its peak RSS, wall time and counts."""
    code = "import sys; from qcloop.monitor.benchmarks.inbox import _child; _child(*sys.argv[1:])"
    argv = [sys.executable, "-c", code, str(run), str(inbox), str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"monitor pass failed with exit code {proc.returncode}")
    counts = json.loads(stdout.decode().strip().splitlines()[-1])
    # the child's own high-water mark (VmHWM); wait4's ru_maxrss also counts this process's
    # memory at fork, which Linux carries into the child's
    peak = counts.pop("peak_rss_mib", usage.ru_maxrss / 1024)
    return {"peak_rss_mib": peak, "seconds": seconds, **counts}


def run_inbox_benchmark(run: Path, data: Path, cases: int = 4, bomb_mib: int = 2048) -> dict:
    """Good cases alone, then among the hostile files: the two passes' figures."""
    from qcloop.monitor.data import discover

    sources = [s for s in discover(data, views=["SA"])][:cases]
    if not sources:
        raise ValueError(f"{data}: no SA case to feed the inbox")
    figures: dict[str, Any] = {"cases": len(sources), "bomb_mib": bomb_mib}
    with tempfile.TemporaryDirectory(prefix="qcloop-bench-inbox-") as tmp:
        root = Path(tmp)
        for name in ("good", "hostile"):
            inbox = root / name / "inbox"
            inbox.mkdir(parents=True)
            for src in sources:
                shutil.copy2(src.image_path, inbox / src.image_path.name)
            if name == "hostile":
                figures["hostile_files"] = write_hostile_files(
                    inbox, inbox / sources[0].image_path.name, bomb_mib
                )
                figures["hostile_inbox_bytes"] = sum(p.lstat().st_size for p in inbox.iterdir())
            figures[name] = _measure(run, inbox, root / name / "out")
    return figures
