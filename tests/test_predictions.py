"""``qcloop assess --predictions``: masks made by another tool, scored by a run's QC module
without running any model (matched by file name or CSV, with a label map), judged when the run
has fences."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.method import mask_files
from qcloop.monitor.method.predictions import score_masks, scored_masks
from qcloop.monitor.method.qc_train import train_qc_run
from tests.helpers import tiny_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: A few subjects keep each scoring to seconds (the cohort has 18): one the tiny run's QC module
#: trained on, one of its validation subjects, and two from the shifted vendors B and C.
SUBJECTS = ("001", "005", "011", "015")


def write_masks(
    cohort: Path, out: Path, *, values: tuple[int, int, int, int] = (0, 1, 2, 3), view: str = "SA"
) -> dict[str, Path]:
    """The ground-truth masks of ``SUBJECTS`` written as another tool would:
    ``out/NNN_VIEW_PHASE_pred.nii.gz``, qcloop label ``l`` stored as ``values[l]``."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for subject in SUBJECTS:
        for gt in sorted((cohort / subject).glob(f"{subject}_{view}_*_gt.nii.gz")):
            nii = nib.load(gt)
            labels = np.asarray(np.asarray(nii.dataobj), dtype=np.uint8)
            data = np.asarray(values, dtype=np.uint8)[labels]
            path = out / gt.name.replace("_gt.nii.gz", "_pred.nii.gz")
            nib.save(nib.Nifti1Image(data, nii.affine), path)
            written[gt.name[: -len("_gt.nii.gz")]] = path
    return written


def subset(cohort: Path, dst: Path) -> Path:
    """A dataset folder holding ``SUBJECTS`` of the cohort and its metadata."""
    dst.mkdir(parents=True)
    shutil.copy(cohort / "dataset_information.csv", dst)
    for subject in SUBJECTS:
        shutil.copytree(cohort / subject, dst / subject)
    return dst


@pytest.fixture(scope="module")
def data(tiny_cohort, tmp_path_factory) -> Path:
    return subset(tiny_cohort, tmp_path_factory.mktemp("pred-data") / "data")


def assess_cli(data: Path, run: Path, masks: Path | None, out: Path, *extra: str):
    args = ["assess", "--data", str(data), "--run", str(run), "--out", str(out), "--view", "SA"]
    if masks is not None:
        args += ["--predictions", str(masks)]
    return CliRunner().invoke(cli, [*args, *extra])


def read_out(out: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return records, json.loads((out / "summary.json").read_text())


def scores(records: list[dict]) -> dict[str, list]:
    return {f"{r['subject']}/{r['phase']}": r["candidates"] for r in records}


def test_ground_truth_masks_score_high_and_are_judged(data, tiny_run, tmp_path) -> None:
    masks = write_masks(data, tmp_path / "masks")
    out = tmp_path / "out"
    result = assess_cli(data, tiny_run, tmp_path / "masks", out)
    assert result.exit_code == 0, result.output
    records, summary = read_out(out)
    assert summary["cases"] == len(records) == len(masks) == 2 * len(SUBJECTS)
    assert summary["skipped"] == [] and summary["views"]["SA"]["population"] == "reference"
    for r in records:
        assert r["source"] == "predictions" and r["view"] == "SA"
        assert r["mask"] == str(masks[f"{r['subject']}_SA_{r['phase']}"])
        assert len(r["candidates"]) == 1 and set(r["candidates"][0]) == {"LV", "MYO", "RV"}
        assert isinstance(r["ood"], bool) and r["fences"] and r["selection"]["index"] == 0
        assert all(v["dice"] == 1.0 for v in r["true_selected"].values())
        assert r["model"] == {"run": str(tiny_run.resolve())}
    # the masks the QC module learnt are reconstructed closely ...
    learnt = [
        r["candidates"][0][s]["pdc"]
        for r in records
        if r["subject"] == SUBJECTS[0]
        for s in ("LV", "MYO", "RV")
    ]
    assert min(learnt) > 0.65 and np.mean(learnt) > 0.75, learnt
    # ... and ground truth looks more plausible than the run's own segmentations of the cases
    result = assess_cli(data, tiny_run, None, tmp_path / "model")
    assert result.exit_code == 0, result.output
    model, _ = read_out(tmp_path / "model")
    truth = [r["candidates"][0]["RV"]["pdc"] for r in records]
    best = [max(c["RV"]["pdc"] for c in r["candidates"]) for r in model]
    assert np.median(truth) > np.median(best), (truth, best)
    assert sum(r["ood"] for r in records) <= sum(r["ood"] for r in model)


def test_a_permuted_label_order_with_its_map_scores_the_same(data, tiny_run, tmp_path) -> None:
    write_masks(data, tmp_path / "canonical")
    write_masks(data, tmp_path / "acdc-order", values=(0, 3, 2, 1))
    canonical, errors = score_masks(tiny_run, data, tmp_path / "canonical", views=["SA"])
    assert errors == []
    result = assess_cli(
        data, tiny_run, tmp_path / "acdc-order", tmp_path / "out", "--label-map", "1:RV,2:MYO,3:LV"
    )
    assert result.exit_code == 0, result.output
    records, _ = read_out(tmp_path / "out")
    assert scores(records) == scores(canonical)
    assert [r["ood"] for r in records] == [r["ood"] for r in canonical]
    # without the map the same masks are read as qcloop's order: LV and RV swap places
    swapped, _ = score_masks(tiny_run, data, tmp_path / "acdc-order", views=["SA"])
    assert scores(swapped) != scores(canonical)


def test_bad_masks_are_error_records_and_the_others_are_scored(data, tiny_run, tmp_path) -> None:
    masks = write_masks(data, tmp_path / "masks")
    wrong_shape = masks[f"{SUBJECTS[0]}_SA_ED"]
    nii = nib.load(wrong_shape)
    nib.save(nib.Nifti1Image(np.asarray(nii.dataobj)[:-3], nii.affine), wrong_shape)
    masks.pop(f"{SUBJECTS[1]}_SA_ES").unlink()
    unmapped = masks[f"{SUBJECTS[2]}_SA_ED"]
    nii = nib.load(unmapped)
    values = np.asarray(nii.dataobj).copy()
    values[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(values, nii.affine), unmapped)

    out = tmp_path / "out"
    result = assess_cli(data, tiny_run, tmp_path / "masks", out)
    assert result.exit_code == 0, result.output
    records, summary = read_out(out)
    assert summary["cases"] == len(records) == 2 * len(SUBJECTS) - 3
    skipped = {s["key"]: s for s in summary["skipped"]}
    assert set(skipped) == {f"{SUBJECTS[0]}/SA/ED", f"{SUBJECTS[1]}/SA/ES", f"{SUBJECTS[2]}/SA/ED"}
    shape = skipped[f"{SUBJECTS[0]}/SA/ED"]
    assert shape["path"] == str(wrong_shape) and "does not match the shape" in shape["reason"]
    missing = skipped[f"{SUBJECTS[1]}/SA/ES"]
    assert (
        missing["path"].endswith(f"{SUBJECTS[1]}_SA_ES.nii.gz") and "no mask" in missing["reason"]
    )
    label = skipped[f"{SUBJECTS[2]}/SA/ED"]
    assert (
        label["path"] == str(unmapped) and "mask value(s) 7 not in the label map" in label["reason"]
    )
    assert str(wrong_shape) in result.output and str(unmapped) in result.output
    # a map sending the stray value to background rescues that case
    _, errors = score_masks(
        tiny_run, data, tmp_path / "masks", views=["SA"], label_map="7:BG,1:LV,2:MYO,3:RV"
    )
    assert f"{SUBJECTS[2]}/SA/ED" not in {e.key for e in errors}


def test_a_mapping_csv_pairs_images_and_masks(data, tiny_run, tmp_path) -> None:
    write_masks(data, tmp_path / "named")
    canonical, _ = score_masks(tiny_run, data, tmp_path / "named", views=["SA"])
    anonymous = tmp_path / "anonymous"
    anonymous.mkdir()
    mapping = tmp_path / "map.csv"
    with mapping.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "mask"])
        for i, (name, path) in enumerate(sorted(write_masks(data, tmp_path / "named").items())):
            path.rename(anonymous / f"case{i}.nii.gz")  # a name that says nothing
            image = data / name.split("_")[0] / f"{name}.nii.gz"
            writer.writerow([os.path.relpath(image, tmp_path), f"anonymous/case{i}.nii.gz"])
        writer.writerow([os.path.relpath(image, tmp_path), "anonymous/nowhere.nii.gz"])
    out = tmp_path / "out"
    result = assess_cli(data, tiny_run, None, out, "--predictions-map", str(mapping))
    assert result.exit_code == 0, result.output
    records, summary = read_out(out)
    assert scores(records) == scores(canonical)
    assert all(Path(r["mask"]).parent == anonymous for r in records)
    assert [s["path"] for s in summary["skipped"]] == [str(anonymous / "nowhere.nii.gz")]
    assert "listed twice" in summary["skipped"][0]["reason"]


@pytest.fixture(scope="module")
def qc_only_run(tiny_cohort, tmp_path_factory) -> Path:
    """A run folder from ``qc train`` (SA, a QC module trained briefly): no candidates, no fences."""
    cfg = tiny_run_config().model_dump(mode="json")
    cfg["qc"].update({"epochs": 1, "min_steps": 4})
    cfg["qc"]["module"]["params"].update({"collapse_dice": 0.0, "collapse_fraction": 0.0})
    run = tmp_path_factory.mktemp("qc-only") / "run"
    train_qc_run(tiny_cohort, run, QcloopConfig.model_validate(cfg), ["SA"])
    return run


def test_a_qc_only_run_scores_masks_without_judging(data, qc_only_run, tmp_path) -> None:
    write_masks(data, tmp_path / "masks")
    out = tmp_path / "out"
    result = assess_cli(data, qc_only_run, tmp_path / "masks", out, "--view", "both")
    assert result.exit_code == 0, result.output
    assert "no fences" in result.output and "calibrate" in result.output
    records, summary = read_out(out)
    assert summary["cases"] == len(records) == 2 * len(SUBJECTS)
    assert set(summary["views"]) == {"SA"} and summary["views"]["SA"]["population"] == "none"
    for r in records:
        assert r["ood"] is None and "fences" not in r and "selection" not in r
        assert all(
            np.isfinite(v["pdc"]) and np.isfinite(v["phd_mm"]) for v in r["candidates"][0].values()
        )
    scored, errors = scored_masks(qc_only_run, data, tmp_path / "masks")
    assert errors == [] and all(s.ood is None and len(s.candidates) == 1 for s in scored)


def test_scored_masks_can_be_left_unjudged(data, tiny_run, tmp_path) -> None:
    """What fitting fences on masks made elsewhere needs: scores without a verdict."""
    write_masks(data, tmp_path / "masks")
    scored, _ = scored_masks(tiny_run, data, tmp_path / "masks", views=["SA"], judge=False)
    assert len(scored) == 2 * len(SUBJECTS)
    assert all(
        s.ood is None and s.fences is None and s.extra["source"] == "predictions" for s in scored
    )


def test_the_dataset_folder_itself_gives_its_ground_truth(data, tiny_run) -> None:
    """Images are never taken for masks: the ``_gt`` files beside them are the only match."""
    records, errors = score_masks(tiny_run, data, data, views=["SA"])
    assert errors == [] and len(records) == 2 * len(SUBJECTS)
    assert all(r["mask"].endswith("_gt.nii.gz") for r in records)


def test_ambiguous_masks_are_errors(data, tiny_run, tmp_path) -> None:
    masks = write_masks(data, tmp_path / "masks")
    first = masks[f"{SUBJECTS[0]}_SA_ED"]
    shutil.copy(first, first.with_name(f"{SUBJECTS[0]}_SA_ED_v2.nii.gz"))
    records, errors = score_masks(tiny_run, data, tmp_path / "masks", views=["SA"])
    assert len(records) == 2 * len(SUBJECTS) - 1
    assert [e.key for e in errors] == [f"{SUBJECTS[0]}/SA/ED"]
    assert "several masks match" in errors[0].reason


def test_label_maps() -> None:
    assert mask_files.parse_label_map(None) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert mask_files.parse_label_map("1:RV, 2:myo ,3:LV") == {0: 0, 1: 3, 2: 2, 3: 1}
    assert mask_files.parse_label_map("1:LV,2:MYO,3:RV,4:BG,5:0") == {
        0: 0,
        1: 1,
        2: 2,
        3: 3,
        4: 0,
        5: 0,
    }
    for bad in ("1=LV", "x:LV", "1:AORTA", "1:LV,1:RV", "1:4"):
        with pytest.raises(ValueError):
            mask_files.parse_label_map(bad)


def test_predictions_need_a_run_and_a_valid_label_map(data, tiny_run, tmp_path) -> None:
    base = ["assess", "--data", str(data), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, [*base, "--model", "x@champion", "--predictions", str(data)])
    assert result.exit_code == 2 and "give --run" in result.output
    result = CliRunner().invoke(
        cli, [*base, "--run", str(tiny_run), "--predictions", str(data), "--label-map", "1:AO"]
    )
    assert result.exit_code == 2 and "--label-map" in result.output
    result = CliRunner().invoke(cli, [*base, "--run", str(tiny_run), "--label-map", "1:LV"])
    assert result.exit_code == 2 and "--predictions" in result.output
