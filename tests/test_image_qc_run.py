"""An image-aware QC module (``qc.module.name: image_autoencoder``) through every path that
reconstructs: QC training, calibration of a model card, ``assess`` (offline), the online
scorer, ``assess --predictions``, figures, refinement; and the paths that cannot take it yet
(ONNX export, refining a card) say so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli
from qcloop.monitor.core.config import QcloopConfig, save_config
from qcloop.monitor.method.calibrate import calibrate_model
from qcloop.monitor.method.run_folder import load_model_set
from tests.helpers import tiny_run_config, torch_card
from tests.test_predictions import subset, write_masks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def image_qc_config() -> QcloopConfig:
    """The tiny run's configuration with the image-aware QC module, trained briefly."""
    data = tiny_run_config().model_dump(mode="json")
    data["qc"].update({"epochs": 4, "min_steps": 60})
    data["qc"]["module"] = {
        "name": "image_autoencoder",
        "params": {"width_scale": 0.25, "latent_channels": 32, "dropout": 0.1, "lr": 2e-3,
                   "collapse_dice": 0.0},
    }  # fmt: skip
    return QcloopConfig.model_validate(data)


def invoke(*args: str) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tiny_run: Path, tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``qc``: the image-aware QC run (SA); ``card``: a torch card calibrated with it;
    ``own``: the tiny run with its SA QC module replaced by the image-aware one."""
    root = tmp_path_factory.mktemp("image-qc")
    cfg = image_qc_config()
    save_config(cfg, root / "config.yaml")
    qc = root / "qc"
    result = invoke("qc", "train", "--data", tiny_cohort, "--out", qc, "--view", "SA",
                    "--config", root / "config.yaml")  # fmt: skip
    assert result.exit_code == 0, result.output
    card = torch_card(tiny_run, root / "vendor")
    calibrated = root / "card-run"
    calibrate_model(qc, card, tiny_cohort, calibrated, views=["SA"], where={"vendor": "A"})
    own = root / "own"
    shutil.copytree(tiny_run, own, ignore=shutil.ignore_patterns("LA"))
    shutil.copy(qc / "SA" / "qc.pt", own / "SA" / "qc.pt")
    save_config(cfg.model_copy(update={"views": ["SA"]}), own / "config.yaml")
    return {"qc": qc, "card": calibrated, "own": own, "root": root}


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def test_training_gives_the_module_images(runs: dict) -> None:
    model_set = load_model_set(runs["card"], "SA", image_qc_config())
    assert type(model_set.qc).__name__ == "ImageMaskQC" and model_set.qc.fitted
    history = json.loads((runs["qc"] / "SA" / "training" / "qc_history.json").read_text())
    assert {"dice", "dice_corrupted"} <= set(history["epochs"][-1])


def test_assess_and_the_online_scorer_agree(runs: dict, tiny_cohort: Path, tmp_path) -> None:
    out = tmp_path / "a"
    data = subset(tiny_cohort, tmp_path / "data")  # four subjects keep it to seconds
    result = invoke("assess", "--run", runs["card"], "--data", data, "--out", out,
                    "--view", "SA", "--figures", "all")  # fmt: skip
    assert result.exit_code == 0, result.output
    recs = records(out)
    assert recs and all("error" not in r and "figure_error" not in r for r in recs)
    assert all(np.isfinite(r["candidates"][0]["RV"]["pdc"]) for r in recs)
    assert all(Path(r["figure"]).is_file() for r in recs)

    from qcloop.monitor.data import discover, load_case
    from qcloop.monitor.ops.scoring import load_online_scorers

    scorer = load_online_scorers(runs["card"], runtime="torch")["SA"]
    assert scorer.runtime.needs_image
    source = next(s for s in discover(data) if s.view == "SA")
    online = scorer.score(load_case(source)).record
    offline = next(r for r in recs if r["image"] == online["image"])
    assert online["candidates"] == offline["candidates"] and online["ood"] == offline["ood"]
    assert scorer.figure_png(scorer.score(load_case(source))).startswith(b"\x89PNG")


def test_masks_made_elsewhere_are_scored_with_their_images(
    runs: dict, tiny_cohort: Path, tmp_path: Path
) -> None:
    data = subset(tiny_cohort, tmp_path / "data")
    masks = write_masks(tiny_cohort, tmp_path / "masks")
    out = tmp_path / "p"
    result = invoke("assess", "--run", runs["card"], "--data", data, "--out", out,
                    "--view", "SA", "--predictions", tmp_path / "masks")  # fmt: skip
    assert result.exit_code == 0, result.output
    recs = records(out)
    assert len(recs) == len(masks) and all(r["source"] == "predictions" for r in recs)
    # (a module that reads the image raises when a caller gives none: these were scored with it)
    assert all(0 <= r["candidates"][0][s]["pdc"] <= 1 for r in recs for s in ("LV", "MYO", "RV"))


def test_refinement_passes_each_case_its_image(runs: dict, tiny_cohort: Path, tmp_path) -> None:
    out = tmp_path / "refined"
    result = invoke("refine", "--run", runs["own"], "--data", tiny_cohort, "--out", out,
                    "--view", "SA")  # fmt: skip
    assert result.exit_code == 0, result.output
    entries = json.loads((out / "SA" / "candidates.json").read_text())
    assert entries and all((out / "SA" / e["path"]).exists() for e in entries)
    refined = torch.load(out / "SA" / entries[0]["path"], weights_only=True)["state_dict"]
    original = torch.load(runs["own"] / "SA" / entries[0]["parent_path"], weights_only=True)
    assert any(not torch.equal(v, original["state_dict"][k]) for k, v in refined.items())


def test_what_cannot_take_it_yet_says_so(runs: dict, tiny_cohort: Path, tmp_path: Path) -> None:
    result = invoke("export-onnx", "--run", runs["own"], "--out", tmp_path / "onnx")
    assert result.exit_code != 0
    assert (
        "reads the image beside the masks" in result.output and "--runtime torch" in result.output
    )
    assert not (tmp_path / "onnx").exists()
    result = invoke("refine", "--run", runs["card"], "--data", tiny_cohort, "--out",
                    tmp_path / "r", "--view", "SA")  # fmt: skip
    assert result.exit_code != 0 and "its QC module reads the image" in result.output
    assert not (tmp_path / "r").exists()
