"""examples/external-model end to end at tiny scale: make_model.py trains a MONAI U-Net in its
own label order and normalisation and writes an ONNX model with its card; evaluate.py runs
calibrate -> predict through the command line on the QC modules of the session's tiny run
(``--reuse-qc``: ``qcloop qc train`` has its own tests) and writes the evidence. Checks the
evidence's structure and that its numbers are finite, not the model's quality."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from qcloop.monitor.core.config import load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "external-model"

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str) -> str:
    """Run an example script with this interpreter; its output (fails with it on an error)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / name), *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def numbers(value: Any) -> list[float]:
    """Every number inside a JSON value."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    return [n for v in value for n in numbers(v)]


@pytest.fixture(scope="module")
def tiny_demo(tiny_run: Path, tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-like folder for the tiny cohort: ``run`` (the session's tiny run, whose QC modules
    evaluate.py reuses) and its evaluations of its own M (what ``qcloop demo`` writes to
    evaluations.jsonl)."""
    from qcloop.monitor.cli.demo_run import evaluate_run

    demo = tmp_path_factory.mktemp("tiny-demo")
    (demo / "run").symlink_to(tiny_run, target_is_directory=True)
    evals = evaluate_run(tiny_run, tiny_cohort, load_config(tiny_run / "config.yaml"))
    (demo / "evaluations.jsonl").write_text(
        "".join(json.dumps({"config": "M/M+QC", **e.to_dict()}) + "\n" for e in evals)
    )
    return demo


def test_make_model_and_evaluate(tiny_demo: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    out = run_script(
        "make_model.py",
        *("--data", str(tiny_cohort), "--out", str(model)),
        *("--size", "64", "--spacing", "4.0", "--slices-per-epoch", "64", "--lr", "5e-3"),
        *("--epochs", "15", "--channels", "8,16,32,64", "--threads", "1"),
    )
    assert "ONNX parity" in out
    card = yaml.safe_load((model / "card.yaml").read_text())
    assert card["kind"] == "onnx" and card["views"] == ["SA", "LA"]
    assert card["output"]["labels"] == {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
    assert card["input"]["normalise"] == "percentile" and card["input"]["size"] == 64
    training = json.loads((model / "training.json").read_text())
    assert training["onnx_parity"]["argmax_agreement"] > 0.99

    evidence_dir = tmp_path / "eval"
    printed = run_script(
        "evaluate.py",
        *("--demo", str(tiny_demo), "--data", str(tiny_cohort), "--model", str(model)),
        *("--out", str(evidence_dir), "--timing-cases", "2", "--reuse-qc"),
    )
    assert "| vendor | view | structure |" in printed
    evidence = json.loads((evidence_dir / "evidence.json").read_text())
    assert all(math.isfinite(n) for n in numbers(evidence))
    commands = [c["command"].split()[:2] for c in evidence["meta"]["commands"][:2]]
    assert commands == [["qcloop", "calibrate"], ["qcloop", "predict"]]
    assert all(c.get("returncode", 0) == 0 for c in evidence["meta"]["commands"])
    keys = {(q["vendor"], q["view"]) for q in evidence["qc"]}
    assert {v for v, _ in keys} == {"A", "B", "C", "all"} and {w for _, w in keys} == {"SA", "LA"}
    for row in evidence["qc"]:
        assert set(row) >= {"external", "qcloop_M"}
        assert 0.0 <= row["external"]["dice"] <= 1.0 and row["external"]["n"] > 0
    for row in evidence["ood"]:
        assert row["external"]["n_cases"] == row["qcloop_M"]["n_cases"]
        for name in ("external", "qcloop_M"):
            counts = row[name]
            assert 0 <= counts["flagged_failures"] <= min(counts["failures"], counts["flagged"])
    assert {t["view"] for t in evidence["timing"]} == {"SA", "LA"}
    assert all(t["cases"] == 2 and t["model_qc_ms"] > 0 for t in evidence["timing"])
    assert evidence["checks"]["max_abs_dice_mask_vs_record"] < 1e-9
    assert evidence["checks"]["max_abs_pdc_scorer_vs_predict"] < 1e-6
    assert (evidence_dir / "evidence.md").read_text().startswith("### Agreement")

    # ... and the calibrated MONAI model goes live: an inbox monitored, a request served, with
    # its ONNX file exported beside the QC module and run by ONNX Runtime
    go_live(evidence_dir / "calibrated", tiny_cohort, tmp_path)


def go_live(run: Path, cohort: Path, tmp_path: Path) -> None:
    """``qcloop monitor`` (in-process runtime) over an inbox of LA cases, then ``qcloop
    export-onnx`` (both views) and ``qcloop serve`` on ONNX Runtime for one SA case."""
    from click.testing import CliRunner

    from qcloop.monitor.cli.main import cli
    from tests.live_support import monitor_once, serve_one

    monitor_once(run, cohort, "LA", tmp_path, 3)
    result = CliRunner().invoke(cli, ["export-onnx", "--run", str(run)])
    assert result.exit_code == 0, result.output
    assert "SA/model.onnx: copied" in result.output
    serve_one(run, cohort, "SA", "onnxruntime")
