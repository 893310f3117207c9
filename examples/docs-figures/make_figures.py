"""The pictures of docs/demo.md, from a real demo folder: the pDC-vs-true-Dice scatter and the
failure ROC of its test cases (as `qcloop report` draws them), and the QC figures of two test
cases (one flagged failure of a shifted vendor, one good in-distribution case).

    python examples/docs-figures/make_figures.py qcloop-demo docs/img

Writes demo-pdc-vs-dice.png, demo-roc.png, demo-case-<subject>-<view>-<phase>.png and
demo-calibration.png (the demo's own calibration.png: est_dice and pDC against true Dice).
"""

from __future__ import annotations

import base64
import shutil
import sys
import tempfile
from pathlib import Path

from qcloop.monitor.core.tracking import NullTracker
from qcloop.monitor.method.assess import assess_run
from qcloop.monitor.report import plots
from qcloop.monitor.report.sources import read_source

#: (subject, view, phase): vendor C, flagged, a failed RV (true Dice 0.30, pDC 0.63); vendor A,
#: not flagged, a good segmentation (true Dice 0.96), in the default demo (seed 0).
CASES = (("112", "SA", "ED"), ("071", "SA", "ED"))


def _png(uri: str | None, path: Path) -> None:
    if uri is None:
        raise SystemExit(f"{path.name}: nothing to draw (no ground truth in the demo folder?)")
    path.write_bytes(base64.b64decode(uri.split(",", 1)[1]))
    print(path)


def main(demo: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = read_source(demo).rows
    _png(plots.pdc_vs_dice(rows), out / "demo-pdc-vs-dice.png")
    _png(plots.roc(rows), out / "demo-roc.png")
    if not (demo / "calibration.png").is_file():
        raise SystemExit(f"{demo}: no calibration.png (a demo folder from before the estimate)")
    shutil.copyfile(demo / "calibration.png", out / "demo-calibration.png")
    print(out / "demo-calibration.png")
    with tempfile.TemporaryDirectory() as tmp:
        # the CSV may write codes without their leading zeros (71 for folder 071)
        where = {"SUBJECT_CODE": [c for s, _, _ in CASES for c in (s, s.lstrip("0"))]}
        assess_run(
            demo / "data", demo / "run", tmp, views=["SA"], where=where, figures="all",
            tracker=NullTracker(),  # a picture for the docs is not an assessment to track
        )  # fmt: skip
        for subject, view, phase in CASES:
            src = Path(tmp) / "figures" / f"{subject}_{view}_{phase}.png"
            dst = out / f"demo-case-{subject}-{view}-{phase}.png"
            shutil.copyfile(src, dst)
            print(dst)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
