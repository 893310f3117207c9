"""``qcloop qc train``: QC modules trained on ground-truth masks alone, in a run folder without
candidates or fences; the same QC training code as ``qcloop train``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli
from qcloop.monitor.core.config import QcloopConfig, save_config
from qcloop.monitor.method import qc_train
from qcloop.monitor.method.run_folder import RunError, load_model_set
from tests.helpers import tiny_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quick_qc_config() -> QcloopConfig:
    """The tiny run's configuration with a QC module trained for a handful of steps: for tests of
    the run folder, not of the QC module's quality."""
    data = tiny_run_config().model_dump(mode="json")
    data["qc"].update({"epochs": 1, "min_steps": 4})
    data["qc"]["module"]["params"].update({"collapse_dice": 0.0, "collapse_fraction": 0.0})
    return QcloopConfig.model_validate(data)


def qc_train_cli(data: Path, out: Path, cfg: QcloopConfig, *extra: str) -> object:
    """``qcloop qc train`` through click, with ``cfg`` saved beside ``out``."""
    config = out.parent / f"{out.name}-config.yaml"
    save_config(cfg, config)
    args = ["qc", "train", "--data", str(data), "--out", str(out), "--config", str(config)]
    return CliRunner().invoke(cli, [*args, *extra])


@pytest.mark.parametrize("view", ["SA", "LA", "both"])
def test_qc_train_writes_qc_modules_and_no_candidates(tiny_cohort, tmp_path, view) -> None:
    run = tmp_path / "qc-run"
    result = qc_train_cli(tiny_cohort, run, quick_qc_config(), "--view", view)
    assert result.exit_code == 0, result.output
    assert "QC-only run written" in result.output
    views = ["SA", "LA"] if view == "both" else [view]
    info = json.loads((run / "run.json").read_text())
    assert info["kind"] == "qc" and info["parent"] is None
    assert {"qcloop_version", "created", "data"} <= set(info)
    assert info["data"] == str(tiny_cohort.resolve())
    assert list(info["views"]) == views
    assert (run / "config.yaml").is_file()
    for v in views:
        counts = info["views"][v]
        assert counts["train_cases"] > 0 and counts["val_cases"] > 0 and counts["train_slices"] > 0
        assert counts["skipped"] == []
        assert {p.name for p in (run / v).iterdir()} == {"qc.pt", "pose.json", "training"}
        assert [p.name for p in (run / v / "training").iterdir()] == ["qc_history.json"]
    for v in {"SA", "LA"} - set(views):
        assert not (run / v).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qc-run", "qc-run-config.yaml"]
    assert qc_train.qc_views(run) == views


def test_a_qc_module_loads_without_candidates(tiny_cohort, tmp_path) -> None:
    run = tmp_path / "qc-run"
    cfg = quick_qc_config()
    qc_train.train_qc_run(tiny_cohort, run, cfg, ["SA"])
    qc_set = qc_train.load_qc_set(run, "SA", cfg)
    assert qc_set.candidates == [] and qc_set.fences == {} and qc_set.pose is not None
    with pytest.raises(RunError, match="holds a QC module only \\(qcloop qc train\\)"):
        load_model_set(run, "SA", cfg)
    result = CliRunner().invoke(
        cli, ["assess", "--data", str(tiny_cohort), "--run", str(run), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code != 0
    assert "holds a QC module only" in result.output and "--predictions" in result.output
    assert not (tmp_path / "o").exists()


def test_an_existing_run_folder_is_never_overwritten(tiny_cohort, tmp_path) -> None:
    run = tmp_path / "qc-run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    result = qc_train_cli(tiny_cohort, run, quick_qc_config(), "--view", "SA")
    assert result.exit_code != 0
    assert "already exists and is not empty" in result.output
    assert [p.name for p in run.iterdir()] == ["keep.txt"]


def test_a_crash_leaves_no_partial_run(tiny_cohort, tmp_path, monkeypatch) -> None:
    trained: list[str] = []
    real = qc_train.train_qc_module

    def fail_on_la(data, view_dir, cfg, tracker):
        if data.view == "LA":
            raise RuntimeError("power cut")
        real(data, view_dir, cfg, tracker)
        trained.append(data.view)

    monkeypatch.setattr(qc_train, "train_qc_module", fail_on_la)
    run = tmp_path / "runs" / "qc-run"
    with pytest.raises(RuntimeError, match="power cut"):
        qc_train.train_qc_run(tiny_cohort, run, quick_qc_config(), ["SA", "LA"])
    assert trained == ["SA"]
    assert list((tmp_path / "runs").iterdir()) == []  # neither the run nor its staging folder


@pytest.mark.slow
def test_qc_train_trains_the_qc_module_that_train_does(tiny_cohort, tmp_path) -> None:
    """One implementation: with the same configuration and data, ``qcloop qc train`` gives the
    QC module, pose and QC history of ``qcloop train``, to the last bit. Both are trained here,
    in one process on one torch thread: a run trained elsewhere (the session's ``tiny_run``,
    perhaps with another thread count) can differ in its last bits."""
    tiny_run = tmp_path / "train-run"
    config = tmp_path / "train-config.yaml"
    cfg = tiny_run_config()  # the segmenter only needs to exist: a few steps of it
    cfg = cfg.model_copy(
        update={"training": cfg.training.model_copy(update={"min_steps": 20, "epochs": 2})}
    )
    save_config(cfg, config)
    args = ["train", "--data", str(tiny_cohort), "--out", str(tiny_run), "--config", str(config)]
    result = CliRunner().invoke(cli, [*args, "--view", "SA"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "qc-run"
    result = qc_train_cli(tiny_cohort, run, cfg, "--view", "SA")
    assert result.exit_code == 0, result.output
    ours = torch.load(run / "SA" / "qc.pt", weights_only=True)
    theirs = torch.load(tiny_run / "SA" / "qc.pt", weights_only=True)
    assert {k: v for k, v in ours.items() if k != "net"} == {
        k: v for k, v in theirs.items() if k != "net"
    }
    assert ours["net"].keys() == theirs["net"].keys()
    assert all(torch.equal(v, theirs["net"][k]) for k, v in ours["net"].items())
    assert (run / "SA" / "pose.json").read_text() == (tiny_run / "SA" / "pose.json").read_text()
    # training records the in-distribution flag rate (leave-one-out) the monitor tests against
    reference = json.loads((tiny_run / "SA" / "fences.json").read_text())["reference"]
    assert 0 <= reference["loo_flagged"] <= reference["loo_cases"] == reference["cases"]
    ours_h = json.loads((run / "SA" / "training" / "qc_history.json").read_text())
    theirs_h = json.loads((tiny_run / "SA" / "training" / "qc_history.json").read_text())
    assert [e.get("loss") for e in ours_h["epochs"]] == [e.get("loss") for e in theirs_h["epochs"]]
    info = json.loads((run / "run.json").read_text())["views"]["SA"]
    trained = json.loads((tiny_run / "run.json").read_text())["views"]["SA"]
    assert {k: info[k] for k in ("train_cases", "val_cases", "train_slices")} == {
        k: trained[k] for k in ("train_cases", "val_cases", "train_slices")
    }
