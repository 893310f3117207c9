"""The image-aware QC module against the paper's mask autoencoder, on a demo's cohort and run.

    python examples/image-qc/compare_qc_modules.py --demo qcloop-demo --out image-qc

1. Trains the image-aware QC module (``image_autoencoder``, same width, schedule and vendor-A
   training masks as the demo's autoencoder) with ``qcloop qc train``'s code, puts it into a
   copy of the demo's run and recalibrates the fences there on the same validation cases.
2. Runs the demo's estimate stage on both runs (the demo's own run copied, so the demo folder is
   not changed): pDC and the calibrated estimate against true Dice per vendor, view and
   structure (docs/method.md, "The image-aware QC module").
3. Writes every vendor-A test case's ground truth as a mask file (right) and the next test
   subject's ground truth centred on its grid (wrong: a plausible heart that is not this one)
   and scores both with each run through ``qcloop assess --predictions``: median true RV Dice,
   median RV pDC and the fraction flagged.

Prints markdown tables and writes ``OUT/comparison.json``. Takes about 15 minutes on 2 CPU cores
for the default demo.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from qcloop.monitor.cli.demo_estimate import estimate_stage
from qcloop.monitor.core.config import QcloopConfig, load_config, save_config
from qcloop.monitor.core.tracking import NullTracker
from qcloop.monitor.data import discover
from qcloop.monitor.method.fences_file import save_reference_fences
from qcloop.monitor.method.qc_train import load_labelled_view, train_qc_run
from qcloop.monitor.method.run_folder import load_model_set
from qcloop.monitor.method.train import calibrate_reference_fences
from qcloop.qc_modules.image_autoencoder import ImageMaskQC

COLUMNS = ("pdc_spearman", "pdc_auroc", "pdc_mae", "pdc_accuracy", "est_spearman", "est_mae",
           "est_accuracy", "est_coverage")  # fmt: skip


def image_run(demo: Path, out: Path) -> tuple[Path, QcloopConfig]:
    """A copy of the demo's run with the image-aware QC module and fences fitted with it."""
    data, cfg = demo / "data", load_config(demo / "config.yaml")
    spec = cfg.model_dump(mode="json")
    accepted = inspect.signature(ImageMaskQC).parameters  # the demo's widths, lr, dropout...
    params = {k: v for k, v in cfg.qc.module.params.items() if k in accepted}
    spec["qc"]["module"] = {"name": "image_autoencoder", "params": params}
    icfg = QcloopConfig.model_validate(spec)
    qc_run = out / "qc-run"
    if not (qc_run / "run.json").exists():
        shutil.rmtree(qc_run, ignore_errors=True)
        train_qc_run(data, qc_run, icfg, tracker=NullTracker())
    run = out / "run-image"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(demo / "run", run)
    save_config(icfg, run / "config.yaml")
    sources = discover(data)
    for view in icfg.views:
        shutil.copy(qc_run / view / "qc.pt", run / view / "qc.pt")
        (run / view / "estimator.json").unlink(missing_ok=True)
        labelled = load_labelled_view(view, sources, data, icfg)
        model_set = load_model_set(run, view, icfg, fences=False)
        fences = calibrate_reference_fences(model_set, labelled.val_cases, icfg)
        save_reference_fences(run / view, fences)
    return run, icfg


def estimates(demo: Path, run: Path, cfg: QcloopConfig, out: Path) -> list[dict[str, Any]]:
    """The demo's estimate stage on ``run``: its rows."""
    out.mkdir(parents=True, exist_ok=True)
    return estimate_stage(out, demo / "data", run, cfg, NullTracker())["rows"]


def _fitted(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``labels`` centre-cropped or zero-padded to ``shape`` (voxel grid of another image)."""
    out = np.zeros(shape, labels.dtype)
    src, dst = [], []
    for have, want in zip(labels.shape, shape, strict=True):
        lo_s, lo_d = max(0, (have - want) // 2), max(0, (want - have) // 2)
        n = min(have, want)
        src.append(slice(lo_s, lo_s + n))
        dst.append(slice(lo_d, lo_d + n))
    out[tuple(dst)] = labels[tuple(src)]
    return out


def write_masks(demo: Path, out: Path, kind: str) -> Path:
    """Every vendor-A test case's mask as another tool would write it: its own ground truth
    (``right``) or the next test subject's, centred on its grid (``wrong``)."""
    data = demo / "data"
    with open(data / "dataset_information.csv") as fh:
        rows = list(csv.DictReader(fh))
    test = [f"{int(r['SUBJECT_CODE']):03d}" for r in rows
            if r["SPLIT"] == "test" and r["VENDOR"] == "A"]  # fmt: skip
    folder = out / f"masks-{kind}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, s in enumerate(test):
        other = test[(i + 1) % len(test)] if kind == "wrong" else s
        for view in ("SA", "LA"):
            for phase in ("ED", "ES"):
                image = nib.load(data / s / f"{s}_{view}_{phase}.nii.gz")
                gt = nib.load(data / other / f"{other}_{view}_{phase}_gt.nii.gz")
                labels = _fitted(np.asarray(gt.dataobj, dtype=np.uint8), image.shape)
                nib.save(
                    nib.Nifti1Image(labels, image.affine),
                    folder / f"{s}_{view}_{phase}_pred.nii.gz",
                )
    return folder


def wrong_masks(demo: Path, runs: dict[str, Path], out: Path) -> dict[str, Any]:
    """True and pseudo RV Dice (medians) and the flagged fraction of right and wrong masks,
    per run, through ``qcloop assess --predictions``."""
    figures: dict[str, Any] = {}
    for kind in ("right", "wrong"):
        masks = write_masks(demo, out, kind)
        for name, run in runs.items():
            dest = out / f"assess-{name}-{kind}"
            shutil.rmtree(dest, ignore_errors=True)
            subprocess.run(
                [sys.executable, "-m", "qcloop.monitor", "assess", "--run", str(run), "--data",
                 str(demo / "data"), "--out", str(dest), "--predictions", str(masks),
                 "--figures", "none"],
                check=True, capture_output=True,
            )  # fmt: skip
            recs = [json.loads(line) for line in (dest / "records.jsonl").read_text().splitlines()]
            for view in ("SA", "LA"):
                mine = [r for r in recs if r["view"] == view]
                figures[f"{name}|{kind}|{view}"] = {
                    "cases": len(mine),
                    "median_rv_dice": statistics.median(
                        r["true_selected"]["RV"]["dice"] for r in mine
                    ),
                    "median_rv_pdc": statistics.median(
                        r["candidates"][0]["RV"]["pdc"] for r in mine
                    ),
                    "flagged": sum(bool(r["ood"]) for r in mine) / len(mine),
                }
    return figures


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_tables(rows: dict[str, list[dict[str, Any]]], swaps: dict[str, Any]) -> None:
    """RV rows (mask / image) and the wrong-mask figures, as markdown."""
    by = {
        n: {(r["cohort"], r["view"]): r for r in rs if r["structure"] == "RV"}
        for n, rs in rows.items()
    }
    print("| cohort | view | n | failures | " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * (4 + len(COLUMNS)))
    for key in sorted(by["mask"]):
        a, b = by["mask"][key], by["image"].get(key)
        if b is None:
            continue
        cells = " | ".join(f"{_f(a[c])} / {_f(b[c])}" for c in COLUMNS)
        print(f"| {key[0]} | {key[1]} | {a['n']} | {a['failures']} | {cells} |")
    print("\n| QC module | masks | view | cases | median true RV Dice | median RV pDC | flagged |")
    print("|---|---|---|---|---|---|---|")
    for key, v in swaps.items():
        name, kind, view = key.split("|")
        print(f"| {name} | {kind} | {view} | {v['cases']} | {v['median_rv_dice']:.3f} | "
              f"{v['median_rv_pdc']:.3f} | {v['flagged']:.2f} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, help="A finished `qcloop demo --out` folder.")
    p.add_argument("--out", type=Path, help="Working folder for the comparison.")
    p.add_argument("--tables", type=Path, help="Only print the tables of a comparison.json.")
    args = p.parse_args()
    if args.tables:
        saved = json.loads(args.tables.read_text())
        print_tables(saved["rows"], saved["wrong_masks"])
        return
    if args.demo is None or args.out is None:
        p.error("--demo and --out are required (or --tables)")
    args.out.mkdir(parents=True, exist_ok=True)
    mask_run = args.out / "run-mask"
    shutil.rmtree(mask_run, ignore_errors=True)
    shutil.copytree(args.demo / "run", mask_run)
    run, icfg = image_run(args.demo, args.out)
    rows = {
        "mask": estimates(
            args.demo, mask_run, load_config(args.demo / "config.yaml"), args.out / "est-mask"
        ),
        "image": estimates(args.demo, run, icfg, args.out / "est-image"),
    }
    swaps = wrong_masks(args.demo, {"mask": mask_run, "image": run}, args.out)
    (args.out / "comparison.json").write_text(
        json.dumps({"rows": rows, "wrong_masks": swaps}, indent=1)
    )
    print_tables(rows, swaps)


if __name__ == "__main__":
    main()
