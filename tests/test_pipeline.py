"""The QC loop end to end on a tiny phantom cohort: train, assess, predict, refine, and the demo's
ablation. Slow (tens of seconds); part of CI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli
from tests.helpers import tiny_run_config

pytestmark = pytest.mark.slow


@pytest.fixture
def trained(tiny_cohort, tiny_run):
    """The session's tiny cohort and the run ``qcloop train`` made of it (both read-only)."""
    return {"data": tiny_cohort, "run": tiny_run}


def test_train_writes_a_loadable_model_set(trained) -> None:
    run = trained["run"]
    info = json.loads((run / "run.json").read_text())
    assert set(info["views"]) == {"SA", "LA"}
    for view in ("SA", "LA"):
        entries = json.loads((run / view / "candidates.json").read_text())
        assert len(entries) == 2
        assert entries[0]["val_dice"] >= entries[1]["val_dice"]
        fences = json.loads((run / view / "fences.json").read_text())
        assert {"ED", "ES", "all"} <= set(fences["phases"])
        assert fences["strategy"] == {"name": "iqr", "params": {"k": 1.5}}
        assert 0.0 <= fences["reference"]["median_pdc"] <= 1.0
        assert (run / view / "qc.pt").exists()


def test_assess_and_predict(trained, tmp_path) -> None:
    data, run = trained["data"], trained["run"]
    out = tmp_path / "pred"
    result = CliRunner().invoke(
        cli, ["predict", "--data", str(data), "--run", str(run), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == len(records) > 0
    rec = records[0]
    assert {"subject", "view", "phase", "candidates", "fences", "ood", "selection"} <= set(rec)
    assert len(rec["candidates"]) == 2 and set(rec["candidates"][0]) == {"LV", "MYO", "RV"}
    for r in records:
        for c in r["candidates"]:
            for s in c.values():
                assert np.isfinite(s["pdc"]) and np.isfinite(s["phd_mm"])
    # masks on the original grid with the original affine
    first = records[0]
    mask = nib.load(first["mask"])
    image = nib.load(first["image"])
    assert mask.shape == image.shape
    assert np.allclose(mask.affine, image.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 3}


def test_a_bad_case_is_reported_and_the_others_kept(trained, tmp_path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(trained["data"], data)
    victim = sorted(data.glob("*/*_SA_ED.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated gzip
    out = tmp_path / "assess"
    result = CliRunner().invoke(
        cli,
        [
            "assess",
            "--data",
            str(data),
            "--run",
            str(trained["run"]),
            "--out",
            str(out),
            "--view",
            "SA",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [s["path"] for s in summary["skipped"]] == [str(victim)]
    n_sa = len(list(data.glob("*/*_SA_E[DS].nii.gz")))
    assert summary["cases"] == n_sa - 1


def test_refine_writes_a_new_model_set_beside_the_original(trained, tmp_path) -> None:
    run, out = trained["run"], tmp_path / "refined"
    before = {p: p.read_bytes() for p in run.rglob("*.pt")}
    result = CliRunner().invoke(
        cli,
        [
            "refine",
            "--data",
            str(trained["data"]),
            "--run",
            str(run),
            "--out",
            str(out),
            "--view",
            "SA",
        ],
    )
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for p in run.rglob("*.pt")} == before  # the original is untouched
    info = json.loads((out / "run.json").read_text())
    assert info["kind"] == "refined" and info["parent"] == str(run.resolve())
    entries = json.loads((out / "SA" / "candidates.json").read_text())
    assert len(entries) == 2 and all((out / "SA" / e["path"]).exists() for e in entries)
    result = CliRunner().invoke(
        cli,
        [
            "assess",
            "--data",
            str(trained["data"]),
            "--run",
            str(out),
            "--out",
            str(tmp_path / "a2"),
        ],
    )
    assert result.exit_code == 0, result.output


def test_demo_ablation_schema(tmp_path) -> None:
    from qcloop.monitor.cli.demo_run import run_demo

    # the schema, not the quality: a few optimiser steps per model keep the whole loop short
    cfg = tiny_run_config()
    cfg = cfg.model_copy(
        update={
            "training": cfg.training.model_copy(update={"min_steps": 40, "epochs": 2}),
            "qc": cfg.qc.model_copy(update={"min_steps": 40, "epochs": 8}),
        }
    )
    result = run_demo(tmp_path / "demo", preset="tiny", config=cfg, workers=1)
    saved = json.loads((tmp_path / "demo" / "ablation.json").read_text())
    assert saved["rows"] == result["rows"]
    configs = {(r["config"], r["vendor"], r["view"]) for r in saved["rows"]}
    for vendor in "ABC":
        for view in ("SA", "LA"):
            for config in ("M", "M+QC", "full"):
                assert (config, vendor, view) in configs
    for r in saved["rows"]:
        assert r["structure"] in {"RV", "LV", "MYO"} and r["n_cases"] > 0
        assert 0 <= r["dice"] <= 1 and np.isfinite(r["hd_mm"])
    for q in saved["qc"]:
        assert {"vendor", "view", "structure", "pearson_dice", "pearson_hd"} <= set(q)
    for o in saved["ood"]:
        assert 0 <= o["flagged"] <= o["n_cases"]
    md = (tmp_path / "demo" / "ablation.md").read_text()
    assert "| A | SA | RV |" in md
    # the quality-estimate stage: the tiny cohort has too few reference cases, so every
    # structure falls back to pDC, says so, and is still measured against true Dice
    est = saved["qc_estimates"]
    assert est["calibrator"] == "linear" and len(est["warnings"]) == 6
    assert {(r["cohort"], r["view"]) for r in est["rows"]} >= {
        ("A", "SA"),
        ("C", "LA"),
        ("all", "SA"),
    }
    assert all(r["est_mae"] == r["pdc_mae"] for r in est["rows"])  # est is pDC here
    assert "## Quality estimates" in md and "- warning: SA RV:" in md
    assert (tmp_path / "demo" / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "demo" / "run" / "SA" / "estimator.json").read_text())["warnings"]
    assert (tmp_path / "demo" / "run" / "SA" / "candidates.json").exists()
    # the demo folder makes a report page (qcloop report; the demo command writes it)
    from qcloop.monitor.report.page import write_report

    info = write_report(tmp_path / "demo", tmp_path / "demo" / "report.html")
    page = (tmp_path / "demo" / "report.html").read_text()
    assert info["bytes"] > 0 and 'id="plot-pdc-vs-dice"' in page and "<h2>Ablation</h2>" in page


def test_assess_broadcasts_case_scored_events(trained, tmp_path) -> None:
    from qcloop.monitor import hookimpl
    from qcloop.monitor.core.events import CaseScored
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    seen: list[dict] = []

    class Listener:
        @hookimpl
        def on_case_scored(self, event: CaseScored) -> None:
            assert event.service is None  # a batch command, not a service
            seen.append(event.record)

    pm = get_plugin_manager()
    listener = Listener()
    pm.register(listener, name="test-listener")
    try:
        result = CliRunner().invoke(
            cli,
            [
                "assess",
                "--data",
                str(trained["data"]),
                "--run",
                str(trained["run"]),
                "--out",
                str(tmp_path / "a"),
                "--view",
                "LA",
            ],
        )
    finally:
        pm.unregister(listener)
    assert result.exit_code == 0, result.output
    records = [
        json.loads(line) for line in (tmp_path / "a" / "records.jsonl").read_text().splitlines()
    ]
    assert [r["subject"] for r in seen] == [r["subject"] for r in records] and records
