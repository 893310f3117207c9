"""The evidence of docs/your-model.md: how well qcloop monitors a model it did not train.

With the phantom cohort of a ``qcloop demo`` folder and a model made by ``make_model.py``, runs
the real command line:

1. ``qcloop qc train``: the QC module on the labelled training cases (vendor A; validated on
   vendor A's validation split), with the demo's configuration (``--reuse-qc``: the demo's
   own QC module instead; ``--qc-run DIR``: a QC run trained before);
2. ``qcloop calibrate``: the model card calibrated on vendor A's validation split;
3. ``qcloop predict`` (``qcloop assess`` that also writes the masks) on the test split of
   vendors A, B and C.

Then, with ground truth, per vendor, view and structure: the true Dice of the masks qcloop
wrote (computed here from the mask files against the ``*_gt`` files), Pearson r of pDC against
that Dice, and the AUROC of -pDC(RV) for the failures (true RV Dice < 0.8), beside the same
figures for qcloop's own model M from the demo's ``evaluations.jsonl``; and the cost QC adds
per case: the model alone (``CardPredictor``) against model + QC (``OnlineScorer.score``).
Prints Markdown tables and writes ``OUT/evidence.json`` and ``OUT/evidence.md``::

    python examples/external-model/evaluate.py --demo qcloop-demo --model /tmp/ext/model \\
        --out /tmp/ext/eval
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor.data import CaseSource, discover, load_case
from qcloop.monitor.method.evaluation import (
    FAILURE_DICE,
    STRUCTURES,
    CaseEvaluation,
    ablation_tables,
    evaluations_from_jsonl,
)
from qcloop.monitor.method.segmentation_metrics import compute_metrics

TEST_SPLIT = "test"
MNMS2_CSV = "dataset_information.csv"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, type=Path, help="a qcloop demo folder")
    p.add_argument("--model", required=True, type=Path, help="make_model.py's output folder")
    p.add_argument("--out", required=True, type=Path, help="new folder for everything written")
    p.add_argument("--data", type=Path, help="dataset (default: DEMO/data)")
    p.add_argument("--config", type=Path, help="qc train configuration (default: DEMO/config.yaml)")
    p.add_argument("--reuse-qc", action="store_true", help="use DEMO/run's QC modules")
    p.add_argument("--qc-run", type=Path, help="use this QC run (qcloop qc train) instead")
    p.add_argument("--view", choices=["SA", "LA", "both"], default="both")
    p.add_argument("--reference-vendor", default="A", help="vendor of the calibration cases")
    p.add_argument("--timing-cases", type=int, default=0, help="cases timed per view (0: all)")
    args = p.parse_args(argv)
    args.data = args.data or args.demo / "data"
    args.config = args.config or args.demo / "config.yaml"
    return args


def qcloop_command() -> list[str]:
    """The ``qcloop`` console script beside this interpreter (else ``python -m``)."""
    script = Path(sys.executable).with_name("qcloop")
    return [str(script)] if script.exists() else [sys.executable, "-m", "qcloop.monitor"]


def run_cli(args: list[str], log: list[dict[str, Any]]) -> None:
    """Run ``qcloop ARGS``, echo its output, and log the command line and its wall time."""
    argv = [*qcloop_command(), *args]
    shown = " ".join(["qcloop", *args])
    print(f"$ {shown}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    sys.stdout.write(done.stdout)
    log.append({"command": shown, "seconds": round(seconds, 1), "returncode": done.returncode})
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"{shown}: exit code {done.returncode}")


def test_subset(data: Path, out: Path) -> Path:
    """A dataset folder holding only the test split of ``data``: links to its files and the
    matching rows of ``dataset_information.csv`` (``qcloop predict`` has no metadata filter)."""
    sources = discover(data, where={"SPLIT": TEST_SPLIT})
    for src in sources:
        for path in (src.image_path, src.gt_path):
            if path is None:
                continue
            link = out / path.parent.relative_to(data) / path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(path.resolve())
    table = next((f / MNMS2_CSV for f in (data, data.parent) if (f / MNMS2_CSV).is_file()), None)
    if table is not None:
        with open(table, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
        with open(out / MNMS2_CSV, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(r for r in rows if r.get("SPLIT", "").lower() == TEST_SPLIT)
    return out


def card_views(card: Path, requested: str) -> list[str]:
    """The views to evaluate: the card's, or the requested one."""
    from qcloop.monitor.core.model_card import load_card

    views = list(load_card(card).views)
    return views if requested == "both" else [v for v in views if v == requested]


def run_chain(args: argparse.Namespace, views: list[str]) -> tuple[Path, Path, list[dict]]:
    """qc train (unless reused), calibrate, predict: the calibrated run, the predict output
    folder and the command log."""
    log: list[dict[str, Any]] = []
    view = views[0] if len(views) == 1 else "both"
    qc_run = args.qc_run or args.demo / "run"
    if not args.reuse_qc and args.qc_run is None:
        qc_run = args.out / "qc-run"
        qc_train = ["qc", "train", "--data", str(args.data), "--out", str(qc_run)]
        run_cli([*qc_train, "--config", str(args.config), "--view", view], log)
    calibrated = args.out / "calibrated"
    card = args.model / "card.yaml"
    where = ["--where", "SPLIT=val", "--where", f"VENDOR={args.reference_vendor}"]
    calibrate = ["calibrate", "--run", str(qc_run), "--model", str(card), "--data", str(args.data)]
    run_cli([*calibrate, "--out", str(calibrated), "--view", view, *where], log)
    test_data = test_subset(args.data, args.out / "test-data")
    predicted = args.out / "predict"
    predict = ["predict", "--run", str(calibrated), "--data", str(test_data)]
    run_cli([*predict, "--out", str(predicted), "--view", view], log)
    return calibrated, predicted, log


def _true(scores: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per structure: Dice, HD, HD95 and whether the structure is missing (as the demo)."""
    return {
        s: {"dice": v.dice, "hd": v.hd, "hd95": v.hd95, "missing": v.penalised}
        for s, v in scores.items()
    }


def read_mask(path: str) -> np.ndarray:
    """A label map written by ``qcloop predict``."""
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj).astype(np.uint8)


def measure(
    calibrated: Path, predicted: Path, data: Path, timing_cases: int
) -> tuple[list[CaseEvaluation], list[dict[str, Any]]]:
    """Every predicted case: the masks' true metrics with its record's pseudo metrics, and
    for the first ``timing_cases`` per view (0: all; after one untimed warm-up call) the model
    alone against model + QC."""
    from qcloop.monitor.method.external import load_card_model
    from qcloop.monitor.ops.scoring import load_online_scorers

    predictor = load_card_model(calibrated / "model" / "card.yaml")
    scorers = load_online_scorers(calibrated, runtime="torch")
    sources = {(s.subject, s.view, s.phase): s for s in discover(data)}
    records = [json.loads(x) for x in (predicted / "records.jsonl").read_text().splitlines()]
    evals: list[CaseEvaluation] = []
    rows: list[dict[str, Any]] = []
    timed: dict[str, int] = {}
    for rec in records:
        src: CaseSource = sources[(rec["subject"], rec["view"], rec["phase"])]
        case = load_case(src)
        true = _true(compute_metrics(read_mask(rec["mask"]), case.gt, case.spacing))
        pseudo = {s: {"pdc": v["pdc"], "phd": v["phd_mm"]} for s, v in rec["candidates"][0].items()}
        key = {k: rec[k] for k in ("subject", "view", "phase", "vendor", "disease", "image")}
        evals.append(CaseEvaluation(key, bool(rec["ood"]), true, true, pseudo))
        row = {"key": key, "record_dice": {s: rec["true_selected"][s]["dice"] for s in STRUCTURES}}
        row["mask_dice"] = {s: true[s]["dice"] for s in STRUCTURES}
        if timing_cases and timed.get(src.view, 0) >= timing_cases:
            rows.append(row)
            continue
        if src.view not in timed:  # untimed warm-up: first calls allocate and plan
            time_case(predictor, scorers[src.view], case)
        timed[src.view] = timed.get(src.view, 0) + 1
        row.update(time_case(predictor, scorers[src.view], case))
        rows.append(row)
    return evals, rows


def time_case(predictor: Any, scorer: Any, case: Any) -> dict[str, Any]:
    """The model alone (a mask on the original grid) against model + QC (an online-scored
    case), in seconds; the model alone's true Dice and the scorer's pDC."""
    t0 = time.perf_counter()
    alone = predictor.original_probabilities(case).argmax(-1).astype(np.uint8)
    model_s = time.perf_counter() - t0
    result = scorer.score(case)
    return {
        "model_s": model_s,
        "scored_s": result.timings_s,
        "alone_dice": {s: v.dice for s, v in compute_metrics(alone, case.gt, case.spacing).items()},
        "scorer_pdc": {s: result.record["candidates"][0][s]["pdc"] for s in STRUCTURES},
    }


def _median(values: Sequence[float]) -> float | None:
    """The median, ``None`` for no value."""
    return float(np.median(values)) if len(values) else None


def timing_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per view: median milliseconds per case of the model alone, model + QC, and the parts."""
    out = []
    for view in sorted({r["key"]["view"] for r in rows if "model_s" in r}):
        timed = [r for r in rows if "model_s" in r and r["key"]["view"] == view]
        model = [1e3 * r["model_s"] for r in timed]
        total = [1e3 * r["scored_s"]["total"] for r in timed]
        entry: dict[str, Any] = {"view": view, "cases": len(timed)}
        entry["model_ms"] = _median(model)
        entry["model_qc_ms"] = _median(total)
        entry["qc_added_ms"] = _median([t - m for t, m in zip(total, model, strict=True)])
        for part in ("preprocess", "segment", "qc", "select_restore"):
            entry[f"{part}_ms"] = _median([1e3 * r["scored_s"][part] for r in timed])
        out.append(entry)
    return out


def checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Agreements that must hold: mask-file Dice vs the record's Dice; the online scorer's pDC
    vs predict's; the model alone vs the mask qcloop wrote (through the QC grid)."""
    diff_record = [abs(r["mask_dice"][s] - r["record_dice"][s]) for r in rows for s in STRUCTURES]
    timed = [r for r in rows if "alone_dice" in r]
    alone = {s: _mean([r["alone_dice"][s] for r in timed]) for s in STRUCTURES}
    written = {s: _mean([r["mask_dice"][s] for r in timed]) for s in STRUCTURES}
    return {
        "max_abs_dice_mask_vs_record": max(diff_record, default=None),
        "timed_cases": len(timed),
        "mean_dice_model_alone": alone,
        "mean_dice_written_mask": written,
    }


def _mean(values: Sequence[float]) -> float | None:
    """The mean, ``None`` for no value."""
    return float(np.mean(values)) if len(values) else None


def scorer_agreement(rows: list[dict[str, Any]], evals: list[CaseEvaluation]) -> float | None:
    """Largest |pDC(online scorer) - pDC(qcloop predict)| over the timed cases."""
    pdc = {e.key["image"]: e.pseudo_m for e in evals}
    diffs = [
        abs(r["scorer_pdc"][s] - pdc[r["key"]["image"]][s]["pdc"])
        for r in rows
        if "scorer_pdc" in r
        for s in STRUCTURES
    ]
    return max(diffs, default=None)


def with_pooled(evals: list[CaseEvaluation]) -> list[CaseEvaluation]:
    """The evaluations, plus a copy of each under vendor ``all``."""
    pooled = [
        CaseEvaluation({**e.key, "vendor": "all"}, e.ood, e.true_m, e.true_selected, e.pseudo_m)
        for e in evals
    ]
    return [*evals, *pooled]


def compare(ext: list[CaseEvaluation], own: list[CaseEvaluation] | None) -> dict[str, Any]:
    """Per vendor/view/structure the Dice and Pearson r, per vendor/view the failures, flags
    and AUROC, of the external model and (when given) of qcloop's own M."""
    evals = {"external": with_pooled(ext)}
    if own is not None:
        views = {e.key["view"] for e in ext}
        evals["qcloop_M"] = with_pooled([e for e in own if e.key["view"] in views])
    tables = {name: ablation_tables(e, []) for name, e in evals.items()}
    qc: list[dict[str, Any]] = []
    for row in tables["external"]["qc"]:
        key = (row["vendor"], row["view"], row["structure"])
        entry = {"vendor": key[0], "view": key[1], "structure": key[2]}
        for name, t in tables.items():
            q = next((r for r in t["qc"] if (r["vendor"], r["view"], r["structure"]) == key), {})
            d = next((r for r in t["rows"] if (r["vendor"], r["view"], r["structure"]) == key), {})
            entry[name] = {
                "n": d.get("n_cases"),
                "dice": d.get("dice"),
                "pearson_dice": q.get("pearson_dice"),
                "pearson_hd": q.get("pearson_hd"),
            }
        qc.append(entry)
    ood: list[dict[str, Any]] = []
    for row in tables["external"]["ood"]:
        key = (row["vendor"], row["view"])
        entry = {"vendor": key[0], "view": key[1]}
        for name, t in tables.items():
            o = next((r for r in t["ood"] if (r["vendor"], r["view"]) == key), {})
            entry[name] = {k: o.get(k) for k in ("n_cases", "failures", "flagged", "auroc_failure")}
            entry[name]["flagged_failures"] = flagged_failures(evals[name], *key)
        ood.append(entry)
    return {"qc": qc, "ood": ood}


def flagged_failures(evals: list[CaseEvaluation], vendor: str, view: str) -> int:
    """How many of one vendor's and view's failures (true RV Dice below the threshold) were
    flagged out of distribution."""
    return sum(
        e.ood and e.true_m["RV"]["dice"] < FAILURE_DICE
        for e in evals
        if (e.key["vendor"], e.key["view"]) == (vendor, view)
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    """A table cell: the number, or ``n/a``."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(evidence: dict[str, Any]) -> str:
    """The evidence as Markdown tables."""
    own = "qcloop_M" in evidence["qc"][0] if evidence["qc"] else False
    lines = [
        "### Agreement: Pearson r of pDC against the true Dice (test split)",
        "",
        "| vendor | view | structure | n | external Dice | external r | M Dice | M r |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for q in evidence["qc"]:
        e, m = q["external"], q.get("qcloop_M", {})
        lines.append(
            f"| {q['vendor']} | {q['view']} | {q['structure']} | {e['n']} | {_fmt(e['dice'])} | "
            f"{_fmt(e['pearson_dice'])} | {_fmt(m.get('dice'))} | {_fmt(m.get('pearson_dice'))} |"
        )
    lines += [
        "",
        f"### Failures (true RV Dice < {FAILURE_DICE}) ranked by -pDC(RV)",
        "",
        "| vendor | view | n | external failures | flagged | flagged failures | AUROC "
        "| M failures | flagged | flagged failures | AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in evidence["ood"]:
        e, m = o["external"], o.get("qcloop_M", {})
        cells = [e["n_cases"], e["failures"], e["flagged"], e["flagged_failures"]]
        cells += [_fmt(e["auroc_failure"]), m.get("failures", "-"), m.get("flagged", "-")]
        cells += [m.get("flagged_failures", "-"), _fmt(m.get("auroc_failure"))]
        lines.append(f"| {o['vendor']} | {o['view']} | " + " | ".join(map(str, cells)) + " |")
    lines += [
        "",
        "### Cost per case (median ms)",
        "",
        "| view | cases | model alone | model + QC | QC added | scorer: preprocess | segment "
        "| QC | select + restore |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in evidence["timing"]:
        parts = ("model_ms", "model_qc_ms", "qc_added_ms", "preprocess_ms", "segment_ms", "qc_ms")
        cells = [_fmt(t[p], 0) for p in (*parts, "select_restore_ms")]
        lines.append(f"| {t['view']} | {t['cases']} | " + " | ".join(cells) + " |")
    if not own:
        lines += ["", "(no evaluations.jsonl in the demo folder: M columns n/a)"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chain, measure, print and write the evidence."""
    args = parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out}: exists and is not empty")
    args.out.mkdir(parents=True, exist_ok=True)
    t0, load_before = time.perf_counter(), os.getloadavg()
    views = card_views(args.model / "card.yaml", args.view)
    calibrated, predicted, log = run_chain(args, views)
    t_measure = time.perf_counter()
    evals, rows = measure(calibrated, predicted, args.out / "test-data", args.timing_cases)
    log.append(
        {
            "command": "measure (ground truth, timings)",
            "seconds": round(time.perf_counter() - t_measure, 1),
        }
    )
    own_file = args.demo / "evaluations.jsonl"
    own = evaluations_from_jsonl(own_file)[0] if own_file.is_file() else None
    training = json.loads((args.model / "training.json").read_text())
    evidence = {
        **compare(evals, own),
        "timing": timing_table(rows),
        "checks": {**checks(rows), "max_abs_pdc_scorer_vs_predict": scorer_agreement(rows, evals)},
        "model": {
            "card": json.loads(json.dumps(_card(args.model))),
            "training": {
                k: training.get(k)
                for k in ("args", "train_slices", "best_epoch", "history", "onnx_parity", "seconds")
            },
        },
        "meta": {
            "command": " ".join(["python", *sys.argv]) if argv is None else None,
            "commands": log,
            "seconds": round(time.perf_counter() - t0, 1),
            "cases": len(evals),
            "views": views,
            "qc_run": str(args.qc_run or ("DEMO/run" if args.reuse_qc else "qcloop qc train")),
            "own_evaluations": str(own_file) if own is not None else None,
            "cpus": os.cpu_count(),
            "loadavg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
    }
    (args.out / "evidence.json").write_text(json.dumps(evidence, indent=2, allow_nan=False) + "\n")
    text = markdown(evidence)
    (args.out / "evidence.md").write_text(text)
    print(text)
    print(f"checks: {json.dumps(evidence['checks'])}")
    print(f"wrote {args.out / 'evidence.json'} in {evidence['meta']['seconds']:.0f} s")
    return 0


def _card(model: Path) -> dict[str, Any]:
    """The model card as data."""
    from qcloop.monitor.core.model_card import load_card

    return load_card(model / "card.yaml").to_dict()


if __name__ == "__main__":
    raise SystemExit(main())
