"""Refining a model qcloop did not train (``monitor/method/refine_card.py``): a ``torch`` card
is fine-tuned on its own grid and in its own label order by the alpha and blend refiners and by
the TENT example plugin, saved as weights beside a new card, and the refined run is a
calibrated run like its parent. Cards that cannot be trained say why, and leave nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli
from qcloop.monitor.core.config import load_config
from qcloop.monitor.data import discover, load_case
from qcloop.monitor.data.preprocess import Preprocessor
from qcloop.monitor.method.calibrate import calibrate_model, file_sha256
from qcloop.monitor.method.refine import refine_run
from qcloop.monitor.method.refine_card import CardSegmenter, resample_centred
from qcloop.monitor.method.run_folder import RunError, load_model_set
from tests.helpers import torch_card

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: The label order of the ``swapped_module`` fixture's network (conftest.py).
SWAPPED_LABELS = "{0: background, 1: RV, 2: MYO, 3: LV}"
#: The card's own grid: coarser than the tiny run's QC grid (4 mm, 64 px).
CARD_GRID = {"spacing_mm": 5.0, "size": 48}


@pytest.fixture(scope="module")
def card_run(
    tiny_run: Path, tiny_cohort: Path, swapped_module: str, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny SA candidate as an outside torch card (RV and LV swapped, its own grid),
    calibrated on vendor A."""
    root = tmp_path_factory.mktemp("card-run")
    card = torch_card(
        tiny_run, root / "vendor", module=swapped_module, labels=SWAPPED_LABELS, input_=CARD_GRID
    )
    calibrate_model(tiny_run, card, tiny_cohort, root / "run", views=["SA"], where={"vendor": "A"})
    return root / "run"


def _refine(card_run: Path, cohort: Path, out: Path, refiner: dict | None = None) -> dict:
    """``refine_run`` of the card run on the whole cohort, with another refiner if given."""
    cfg = load_config(card_run / "config.yaml")
    if refiner is not None:
        data = cfg.model_dump(mode="json")
        data["refinement"]["refiner"] = refiner
        cfg = type(cfg).model_validate(data)
    return refine_run(cohort, card_run, out, cfg, views=["SA"])


def _weights_changed(card_run: Path, refined: Path) -> bool:
    before = torch.load(card_run / "model" / "weights.pt", weights_only=True)
    after = torch.load(refined / "SA" / "model" / "weights.pt", weights_only=True)
    assert before.keys() == after.keys()
    return any(not torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- building blocks


def test_card_segmenter_gives_qcloops_label_order() -> None:
    torch.manual_seed(0)
    raw = torch.randn(2, 5, 8, 8)
    module = torch.nn.Identity()
    # model classes: 0 bg, 1 RV, 2 MYO, 3 LV, 4 another background class
    index = np.array([0, 3, 2, 1, 0])
    probs = torch.softmax(CardSegmenter(module, index, "softmax", 8)(raw), 1)
    model = torch.softmax(raw, 1)
    torch.testing.assert_close(probs[:, 0], model[:, 0] + model[:, 4])
    torch.testing.assert_close(probs[:, 1:], model[:, [3, 2, 1]])
    as_probs = CardSegmenter(module, index, "none", 8)(model)  # probabilities in, log out
    torch.testing.assert_close(torch.softmax(as_probs, 1), probs)
    with pytest.raises(ValueError, match="cannot be trained"):
        CardSegmenter(module, index, "labels", 8)
    with pytest.raises(ValueError, match="do not cover"):
        CardSegmenter(module, np.array([0, 1, 2, 2]), "softmax", 8)


def test_resample_centred_keeps_the_centre_and_the_background() -> None:
    size = 33
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = (np.hypot(yy, xx) <= 6).astype(np.float32)  # radius 6 px at 2 mm = 12 mm
    probs = np.stack([1 - disc, disc, 0 * disc, 0 * disc])[None]
    same = resample_centred(probs, 2.0, size, 2.0)
    np.testing.assert_allclose(same, probs, atol=1e-5)
    finer = resample_centred(probs, 2.0, 81, 1.0)  # 1 mm: the disc is 12 px across the radius
    np.testing.assert_allclose(finer.sum(1), 1.0, atol=1e-5)
    labels = finer[0].argmax(0)
    assert labels[40, 40] == 1 and labels[40, 40 + 11] == 1 and labels[40, 40 + 13] == 0
    np.testing.assert_allclose(finer[0, 0, :, :3], 1.0)  # beyond the source: background


def _dice(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Dice of labels 1-3 between two label stacks."""
    return [
        2 * np.logical_and(a == k, b == k).sum() / max((a == k).sum() + (b == k).sum(), 1)
        for k in (1, 2, 3)
    ]


@pytest.mark.parametrize(
    ("card_grid", "qc_grid"), [((5.0, 48), (4.0, 64)), ((1.5, 160), (1.8, 128))]
)
def test_the_grid_map_round_trips_and_lands_within_a_pixel(
    tiny_cohort: Path, card_grid: tuple[float, int], qc_grid: tuple[float, int]
) -> None:
    """Ground-truth maps on a card's grid, taken to the QC grid by the case-blind centred map:
    back on the card's grid they are unchanged (what the refiners compare with the model's
    output), and on the QC grid they sit within a pixel of where the case's own transforms put
    them (the two windows' half-pixel rounding), a shift the QC module's training positions
    cover. The case's own transforms round-trip no better."""
    (cs, cz), (qs, qz) = card_grid, qc_grid
    card, qc = Preprocessor(cz, target_spacing=cs), Preprocessor(qz, target_spacing=qs)
    mapped_trip, exact_trip = [], []
    for source in [s for s in discover(tiny_cohort) if s.view == "SA"][:6]:
        case = load_case(source)
        t_card, t_qc = (p.transform_for(case.shape, case.spacing) for p in (card, qc))
        labels = t_card.apply_labels(case.gt)
        on_card = np.moveaxis(np.eye(4, dtype=np.float32)[labels], -1, 1)
        mapped = resample_centred(on_card, cs, qz, qs)
        back = resample_centred(mapped, qs, cz, cs)
        mapped_trip += _dice(back.argmax(1), labels)
        exact = t_qc.apply_probabilities(t_card.restore_probabilities(on_card))
        exact_back = t_card.apply_probabilities(t_qc.restore_probabilities(exact))
        exact_trip += _dice(exact_back.argmax(1), labels)
        centres = [np.argwhere(m.argmax(1) > 0)[:, 1:].mean(0) for m in (mapped, exact)]
        assert np.abs(centres[0] - centres[1]).max() < 0.75
    assert min(mapped_trip) > 0.99
    assert np.mean(mapped_trip) >= np.mean(exact_trip)


# --------------------------------------------------------------------------- refinement


def test_refine_command_refines_a_torch_card(
    card_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "refined"
    args = ["refine", "--run", str(card_run), "--data", str(tiny_cohort), "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--view", "SA"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["kind"] == "external" and info["parent"] == str(card_run.resolve())
    assert info["card"]["kind"] == "torch" and info["qc_run"]
    view = info["views"]["SA"]
    assert view["flagged"] > 0, "the tiny cohort's vendors B and C should be flagged"
    history = view["history"][0]
    assert history["refiner"] == "alpha" and history["epochs"]
    card = yaml.safe_load((out / "SA" / "model" / "card.yaml").read_text())
    assert card["path"] == "weights.pt" and card["views"] == ["SA"]
    assert card["input"]["spacing_mm"] == 5.0 and card["output"]["labels"]["1"] == "RV"
    entry = json.loads((out / "SA" / "candidates.json").read_text())[0]
    assert entry["sha256"] == file_sha256(out / "SA" / "model" / "weights.pt")
    assert view["model"]["sha256"] == entry["sha256"]
    assert _weights_changed(card_run, out)

    # the refined run is a calibrated run: assessed, packaged, refined again
    assessed = tmp_path / "assess"
    args = ["assess", "--run", str(out), "--data", str(tiny_cohort), "--out", str(assessed)]
    result = CliRunner().invoke(cli, [*args, "--view", "SA"])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (assessed / "records.jsonl").read_text().splitlines()]
    assert records and all(np.isfinite(r["candidates"][0]["RV"]["pdc"]) for r in records)
    from qcloop.monitor.ops.run_package import model_files

    assert {"SA/model/card.yaml", "SA/model/weights.pt"} <= set(model_files(out, "SA"))
    again = _refine(out, tiny_cohort, tmp_path / "again")
    assert again["kind"] == "external"
    assert load_model_set(tmp_path / "again", "SA").best.card.kind == "torch"


def test_blend_refines_a_torch_card(card_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    blend = {"name": "blend", "params": {"epochs": 1, "max_slices_per_epoch": 16}}
    info = _refine(card_run, tiny_cohort, tmp_path / "blend", blend)
    history = info["views"]["SA"]["history"][0]
    assert history["refiner"] == "blend" and len(history["epochs"]) == 1
    assert _weights_changed(card_run, tmp_path / "blend")


def test_tent_refines_a_torch_card(card_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    pytest.importorskip("qcloop_tent", reason="pip install -e examples/qcloop-tent")
    tent = {"name": "tent", "params": {"epochs": 1, "lr": 0.001}}
    info = _refine(card_run, tiny_cohort, tmp_path / "tent", tent)
    assert info["views"]["SA"]["history"][0]["refiner"] == "tent"
    assert _weights_changed(card_run, tmp_path / "tent")


# --------------------------------------------------------------------------- refusals


def _torchscript_card(tiny_run: Path, folder: Path) -> Path:
    """The tiny SA candidate traced to TorchScript, with its card."""
    torch_card_path = torch_card(tiny_run, folder)
    card = yaml.safe_load(torch_card_path.read_text())
    from qcloop.monitor.method.external import load_card_model

    module = load_card_model(torch_card_path).model.module
    traced = torch.jit.trace(module.eval(), torch.zeros(1, 1, 64, 64))
    traced.save(str(folder / "model.ts"))
    card.update({"kind": "torchscript", "path": "model.ts"})
    del card["module"], card["params"]
    torch_card_path.write_text(yaml.safe_dump(card, sort_keys=False))
    return torch_card_path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        ("torchscript", "its torchscript model is not trainable here"),
        ("native-grid", "needs the card's fixed grid (input.spacing_mm and input.size)"),
        ("masks", "calibrated on masks made elsewhere"),
    ],
)
def test_what_cannot_be_refined_says_why_and_leaves_nothing(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path, make: str, reason: str
) -> None:
    run = tmp_path / "run"
    if make == "masks":
        masks = tmp_path / "masks"
        masks.mkdir()
        for gt in sorted(tiny_cohort.rglob("*_SA_*_gt.nii.gz")):
            shutil.copy2(gt, masks / gt.name.replace("_gt", "_pred"))
        args = ["calibrate", "--run", str(tiny_run), "--data", str(tiny_cohort)]
        args += ["--predictions", str(masks), "--out", str(run), "--view", "SA"]
        assert CliRunner().invoke(cli, args).exit_code == 0
    else:
        card = (
            _torchscript_card(tiny_run, tmp_path / "vendor")
            if make == "torchscript"
            else torch_card(tiny_run, tmp_path / "vendor", input_={"spacing_mm": None})
        )
        calibrate_model(tiny_run, card, tiny_cohort, run, views=["SA"], where={"vendor": "A"})
    out = tmp_path / "refined"
    args = ["refine", "--run", str(run), "--data", str(tiny_cohort), "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert reason in result.output
    assert not out.exists()
    if make != "masks":
        assert "monitoring, drift alerts and serving work" in result.output
    with pytest.raises(RunError, match=r"cannot refine|no model here"):
        refine_run(tiny_cohort, run, out)
