"""The picture of docs/monitoring.md: the `qcloop report` page of a real monitor folder.

The demo's run watches 40 vendor-A, then 40 vendor-C, then 40 vendor-B short-axis test cases
(its own policy alerts; refinement off, to keep it short); every other case's ground truth comes
back as a correction through OUT/corrected/; the report page is rendered by headless Chromium.

    python examples/docs-figures/monitor_report.py qcloop-demo /tmp/monitor-picture docs/img

Needs qcloop with the mlflow and report extras, and Debian's chromium. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qcloop.monitor.data import discover


def _monitor(demo: Path, work: Path) -> None:
    cmd = ["qcloop", "monitor", "--run", str(demo / "run"), "--inbox", "in", "--out", "out",
           "--config", "cfg.yaml", "--once", "--settle-s", "0"]  # fmt: skip
    subprocess.run(cmd, cwd=work, check=True, capture_output=True)


def _feed(work: Path, cases: list, start: float) -> None:
    for i, s in enumerate(cases):  # oldest first: the order the monitor takes them
        dst = work / "in" / s.image_path.name
        shutil.copy2(s.image_path, dst)
        os.utime(dst, (start + i, start + i))


def _correct(work: Path, truth: dict[str, Path], first: int) -> None:
    lines = (work / "out" / "records.jsonl").read_text().splitlines()
    for rec in [json.loads(x) for x in lines][first::2]:
        gt = truth.get(rec["source_file"])
        if gt is not None:
            shutil.copy2(gt, work / "out" / "corrected" / f"{rec['case_id']}_gt.nii.gz")


def main(demo: Path, work: Path, img: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    (work / "in").mkdir(parents=True)
    (work / "out" / "corrected").mkdir(parents=True)
    (work / "cfg.yaml").write_text("monitoring:\n  refine_on_alert: false\n  http_port: 0\n")
    test = discover(demo / "data", views=["SA"], where={"SPLIT": "test"})
    by_vendor = {v: [s for s in test if s.vendor == v][:40] for v in "ACB"}
    truth = {s.image_path.name: s.gt_path for s in test if s.gt_path is not None}
    _feed(work, by_vendor["A"] + by_vendor["C"], time.time() - 1000)
    _monitor(demo, work)
    _correct(work, truth, 0)
    _feed(work, by_vendor["B"], time.time() - 500)
    _monitor(demo, work)  # takes the corrections, then the vendor-B cases
    _correct(work, truth, 80)
    _monitor(demo, work)
    subprocess.run(["qcloop", "report", "out"], cwd=work, check=True)
    png = img / "monitor-report.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={png.resolve()}", "--window-size=1000,1480",
         (work / "out" / "report.html").resolve().as_uri()],
        check=True, capture_output=True,
    )  # fmt: skip
    print(png)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
