"""`qcloop calibrate`: a model qcloop did not train, described by a model card, calibrated on a
QC run; the result is a run folder that assess, predict and the online scorers (monitor, serve)
accept. The model here is the session's tiny BN2 candidate presented as an outside ``torch``
card (its class by import path, its weights, its preprocessing), once in qcloop's label order
and once with RV and LV swapped: both must give the same fences, to the last digit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli
from qcloop.monitor.method.calibrate import calibrate_model, file_sha256
from qcloop.monitor.method.run_folder import RunError, load_fences
from tests.helpers import torch_card

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calibrated(tiny_run: Path, tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run's SA candidate, as a card, calibrated on vendor A's cases."""
    root = tmp_path_factory.mktemp("calibrated")
    card = torch_card(tiny_run, root / "vendor")
    out = root / "run"
    result = CliRunner().invoke(
        cli,
        [
            "calibrate",
            "--run",
            str(tiny_run),
            "--model",
            str(card),
            "--data",
            str(tiny_cohort),
            "--out",
            str(out),
            "--view",
            "SA",
            "--where",
            "vendor=A",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "fences from" in result.output
    return out


def test_calibrated_run_is_self_contained(calibrated: Path) -> None:
    info = json.loads((calibrated / "run.json").read_text())
    assert info["kind"] == "external" and info["card"]["kind"] == "torch"
    assert info["model"]["sha256"] == file_sha256(calibrated / info["model"]["file"])
    card = yaml.safe_load((calibrated / "model" / "card.yaml").read_text())
    assert card["path"] == "weights.pt"  # the copy beside the card, not the original
    entries = json.loads((calibrated / "SA" / "candidates.json").read_text())
    assert entries[0]["card"] == "../model/card.yaml"
    assert (calibrated / "SA" / "qc.pt").exists() and not (calibrated / "LA").exists()
    assert info["views"]["SA"]["reference_cases"] > 0
    assert "all" in load_fences(calibrated, "SA")
    assert not list(calibrated.parent.glob(".run.partial-*"))


def test_label_order_is_mapped(
    calibrated: Path, tiny_run: Path, tiny_cohort: Path, swapped_module: str, tmp_path: Path
) -> None:
    card = torch_card(
        tiny_run,
        tmp_path / "swapped",
        module=swapped_module,
        labels="{0: background, 1: RV, 2: MYO, 3: LV}",
    )
    out = tmp_path / "run"
    calibrate_model(tiny_run, card, tiny_cohort, out, views=["SA"], where={"vendor": "A"})
    want, got = load_fences(calibrated, "SA"), load_fences(out, "SA")
    assert {k: f.to_dict() for k, f in got.items()} == {k: f.to_dict() for k, f in want.items()}


def test_assess_and_online_scoring_accept_the_run(
    calibrated: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "assess"
    result = CliRunner().invoke(
        cli,
        [
            "assess",
            "--run",
            str(calibrated),
            "--data",
            str(tiny_cohort),
            "--out",
            str(out),
            "--view",
            "SA",
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert records and all("error" not in r for r in records)
    assert all(np.isfinite(r["candidates"][0]["RV"]["pdc"]) for r in records)
    assert {r["ood"] for r in records} <= {True, False}

    from qcloop.monitor.data import discover, load_case
    from qcloop.monitor.ops.scoring import load_online_scorers

    scorer = load_online_scorers(calibrated, runtime="torch")["SA"]
    case = load_case(next(s for s in discover(tiny_cohort) if s.view == "SA"))
    result = scorer.score(case)
    assert result.labels.shape == case.shape
    assert result.record["runtime"]["providers"] == ["torch:cpu"]


def test_bad_calibrations_leave_nothing(tiny_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    card = torch_card(tiny_run, tmp_path / "vendor")
    with pytest.raises(RunError, match="segments \\['SA'\\], not LA"):
        calibrate_model(tiny_run, card, tiny_cohort, tmp_path / "a", views=["LA"])
    qc_only = tmp_path / "qc-only"
    shutil.copytree(tiny_run, qc_only, ignore=shutil.ignore_patterns("LA"))
    shutil.rmtree(qc_only / "SA")
    with pytest.raises(RunError, match="no QC module for view SA"):
        calibrate_model(qc_only, card, tiny_cohort, tmp_path / "b")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    with pytest.raises(RunError, match="not empty"):
        calibrate_model(tiny_run, card, tiny_cohort, taken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qc-only", "taken", "vendor"]


def test_registry_packages_the_card_and_its_model(calibrated: Path, tmp_path: Path) -> None:
    from qcloop.monitor.method.run_folder import load_model_set
    from qcloop.monitor.ops.run_package import model_files, run_digest, stage, verify

    files = model_files(calibrated, "SA")
    assert {"model/card.yaml", "model/weights.pt", "SA/qc.pt", "SA/fences.json"} <= set(files)
    digest = stage(calibrated, "SA", tmp_path / "copy")
    assert digest == run_digest(calibrated, "SA")
    verify(tmp_path / "copy", "SA", digest)
    model_set = load_model_set(tmp_path / "copy", "SA")
    assert model_set.best.card.kind == "torch"


def test_masks_made_elsewhere_are_calibrated_then_judged(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    """Fences fitted on another tool's masks (here the ground truth itself, in RV/LV-swapped
    values) judge that tool's masks with ``assess --predictions``."""
    import nibabel as nib

    masks = tmp_path / "masks"
    masks.mkdir()
    for gt in sorted(tiny_cohort.rglob("*_SA_*_gt.nii.gz")):
        img = nib.load(gt)
        data = np.asarray(img.dataobj).astype(np.uint8)
        swapped = np.choose(data, [0, 3, 2, 1]).astype(np.uint8)
        nib.save(nib.Nifti1Image(swapped, img.affine), masks / gt.name.replace("_gt", ""))
    run = tmp_path / "run"
    args = [
        "--data",
        str(tiny_cohort),
        "--predictions",
        str(masks),
        "--label-map",
        "1:RV,2:MYO,3:LV",
    ]
    result = CliRunner().invoke(
        cli, ["calibrate", "--run", str(tiny_run), "--out", str(run), "--view", "SA", *args]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((run / "run.json").read_text())["kind"] == "masks"
    assert "all" in load_fences(run, "SA")
    out = tmp_path / "assess"
    result = CliRunner().invoke(
        cli, ["assess", "--run", str(run), "--out", str(out), "--view", "SA", *args]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert records and {r["ood"] for r in records} <= {True, False}
