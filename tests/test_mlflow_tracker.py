"""The ``mlflow`` tracker on its offline default (SQLite in the working folder, no server):
training, calibration and assessment runs with params, per-epoch metrics and artifacts."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qcloop.monitor.core.config import QcloopConfig
from qcloop.plugins.mlflow.store import default_tracking_uri
from qcloop.plugins.mlflow.tracker import MlflowTracker, TrackingError, metric_key
from tests.conftest import tiny_run_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One working folder (and so one mlflow.db) for the module: the schema takes seconds."""
    return tmp_path_factory.mktemp("tracking")


@pytest.fixture
def in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in ``workdir`` with no MLFLOW_TRACKING_URI: the SQLite default applies."""
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return workdir


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _runs(uri: str, experiment: str) -> dict[str, Any]:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} was not created"
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def _artifacts(uri: str, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in _client(uri).list_artifacts(run_id, path)}


def test_default_uri_is_sqlite_in_the_working_folder(
    in_workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert default_tracking_uri() == f"sqlite:///{in_workdir.resolve() / 'mlflow.db'}"
    assert MlflowTracker().tracking_uri == default_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert MlflowTracker().tracking_uri == "http://127.0.0.1:1"
    assert MlflowTracker("sqlite:///x.db").tracking_uri == "sqlite:///x.db"


def test_the_plugin_registers_the_tracker_and_the_config_selects_it(in_workdir: Path) -> None:
    from qcloop.monitor.core.plugin_manager import get_plugin_manager
    from qcloop.monitor.core.tracking import make_tracker

    trackers = get_plugin_manager().trackers()
    assert trackers.plugin_of("mlflow") == "qcloop.plugins.mlflow.plugin"
    cfg = QcloopConfig.model_validate(
        {"tracking": {"tracker": {"name": "mlflow", "params": {"experiment": "cfg"}}}}
    )
    tracker = make_tracker(cfg)
    assert isinstance(tracker, MlflowTracker) and tracker.experiment == "cfg"
    with pytest.raises(ValueError, match="experiment must be a non-empty string"):
        MlflowTracker(experiment="")


def test_the_plugin_registers_the_model_registry_with_the_default_store(
    in_workdir: Path, tmp_path: Path
) -> None:
    from qcloop.monitor.core.plugin_manager import get_plugin_manager
    from qcloop.monitor.core.resolve import build_model_registry
    from qcloop.plugins.mlflow.registry import MlflowRegistry

    assert get_plugin_manager().model_registries().plugin_of("mlflow") == (
        "qcloop.plugins.mlflow.plugin"
    )
    registry = build_model_registry(QcloopConfig())
    assert isinstance(registry, MlflowRegistry) and registry.uri == default_tracking_uri()
    cfg = QcloopConfig.model_validate({"registry": {"uri": "sqlite:///r.db"}})
    assert build_model_registry(cfg).uri == "sqlite:///r.db"
    chosen = build_model_registry(cfg, uri="sqlite:///cli.db", cache_dir=tmp_path)
    assert chosen.uri == "sqlite:///cli.db" and chosen.cache_dir == tmp_path


def test_without_mlflow_the_plugin_loads_and_building_names_the_extra(
    in_workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from qcloop.monitor.cli.main import cli
    from qcloop.monitor.core.optional import MissingExtraError
    from qcloop.plugins.mlflow.registry import MlflowRegistry

    modules = ", ".join(f"qcloop.plugins.mlflow.{m}" for m in ("plugin", "registry", "tracker"))
    code = f"import sys; sys.modules['mlflow'] = None; import {modules}"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    monkeypatch.setitem(sys.modules, "mlflow", None)
    extra = re.escape("pip install 'qcloop[mlflow]'")
    with pytest.raises(MissingExtraError, match=f"MLflow model registry needs .*{extra}"):
        MlflowRegistry()
    with pytest.raises(MissingExtraError, match=f"MLflow tracker needs .*{extra}"):
        MlflowTracker()
    result = CliRunner().invoke(cli, ["models", "list"])
    assert result.exit_code != 0 and "pip install 'qcloop[mlflow]'" in result.output


@pytest.mark.slow
def test_training_run_records_params_epoch_metrics_and_artifacts(
    in_workdir: Path, tiny_cohort: Path
) -> None:
    from qcloop.monitor.method.train import train_run

    base = tiny_run_config().model_dump(mode="json")
    # a short schedule: this checks what is recorded, not how well the model segments
    base["training"].update(epochs=3, min_steps=24)
    base["tracking"] = {"tracker": {"name": "mlflow", "params": {"experiment": "train"}}}
    cfg = QcloopConfig.model_validate(base)
    info = train_run(tiny_cohort, in_workdir / "run", cfg, ["SA"])
    assert (in_workdir / "mlflow.db").is_file()

    uri = default_tracking_uri()
    runs = _runs(uri, "train")
    assert set(runs) == {"train run", "train run SA", "calibrate SA"}
    top, view, cal = runs["train run"], runs["train run SA"], runs["calibrate SA"]
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert view.data.tags["mlflow.parentRunId"] == top.info.run_id
    assert cal.data.tags["mlflow.parentRunId"] == view.info.run_id
    assert top.data.params["segmenter.name"] == "bn2"
    assert top.data.params["segmenter.params.base_width"] == "8"
    assert top.data.params["seed"] == "0"
    assert top.data.params["data"] == str(tiny_cohort.resolve())
    assert _artifacts(uri, top.info.run_id) == {"config.yaml", "run.json"}

    client = _client(uri)
    history = json.loads((in_workdir / "run" / "SA" / "training" / "history.json").read_text())
    assert len(history) >= 3
    loss = sorted(client.get_metric_history(view.info.run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == [int(r["epoch"]) for r in history]
    assert [m.value for m in loss] == pytest.approx([r["train_loss"] for r in history])
    dice = client.get_metric_history(view.info.run_id, "val_dice")
    assert len(dice) == sum("val_dice" in r for r in history) > 0
    assert any(k.startswith("qc/") for k in view.data.metrics), sorted(view.data.metrics)
    best = info["views"]["SA"]["candidates"][0]["val_dice"]
    assert view.data.metrics["best_val_dice"] == pytest.approx(best)
    assert view.data.params["train_cases"] == str(info["views"]["SA"]["train_cases"])
    assert _artifacts(uri, view.info.run_id, "SA") >= {
        "SA/candidates.json",
        "SA/fences.json",
        "SA/training",
    }
    assert _artifacts(uri, view.info.run_id, "SA/training") == {
        "SA/training/history.json",
        "SA/training/qc_history.json",
    }
    fences = json.loads((in_workdir / "run" / "SA" / "fences.json").read_text())
    for phase, f in fences["phases"].items():
        assert cal.data.metrics[f"fence.{phase}.pdc_low"] == pytest.approx(f["pdc_low"])
        assert cal.data.metrics[f"fence.{phase}.phd_high"] == pytest.approx(f["phd_high"])
    assert cal.data.params["strategy"] == "iqr"
    assert _artifacts(uri, cal.info.run_id, "SA") == {"SA/fences.json"}


def test_assessment_run_records_counts_and_ood_fraction(
    in_workdir: Path, tiny_cohort: Path, tiny_run: Path
) -> None:
    from qcloop.monitor.method.assess import assess_run

    tracker = MlflowTracker(experiment="assess")
    out = in_workdir / "assessed"
    summary = assess_run(
        tiny_cohort,
        tiny_run,
        out,
        views=["SA"],
        where={"VENDOR": "C", "DISEASE": ["NOR", "LV"]},
        tracker=tracker,
    )
    run = _runs(tracker.tracking_uri, "assess")[f"assess {out.name}"]
    m = run.data.metrics
    sa = summary["views"]["SA"]
    assert m["SA.cases"] == sa["cases"] == 4
    assert m["SA.ood"] == sa["ood"]
    assert m["SA.ood_fraction"] == pytest.approx(sa["ood"] / sa["cases"])
    assert run.data.params["run"] == str(tiny_run.resolve())
    path = _client(tracker.tracking_uri).download_artifacts(
        run.info.run_id, "summary.json", str(in_workdir / "dl")
    )
    assert json.loads(Path(path).read_text()) == summary


def test_nested_runs_failure_status_and_refused_values(in_workdir: Path) -> None:
    tracker = MlflowTracker(experiment="unit", tags={"team": "qc"})
    with pytest.raises(TrackingError, match="no MLflow run is open"):
        tracker.log_metrics({"x": 1.0})
    with pytest.raises(RuntimeError, match="boom"), tracker.start_run("outer") as outer:
        assert tracker.run_id == outer
        with tracker.start_run("inner", tags={"view": "SA"}) as inner:
            tracker.log_metrics({"M+QC.dice": 0.5, "bad": math.nan, "inf": math.inf}, step=2)
            tracker.log_params({"a": {"b": 1, "c": [1, 2]}})
            tracker.set_tags({"stage": "x"})
            missing = in_workdir / "nope.txt"
            with pytest.raises(FileNotFoundError, match=r"nope\.txt: artifact to log does not"):
                tracker.log_artifact(str(missing))
            raise RuntimeError("boom")
    assert tracker.run_id is None
    runs = _runs(tracker.tracking_uri, "unit")
    assert runs["outer"].info.status == runs["inner"].info.status == "FAILED"
    data = runs["inner"].data
    assert data.tags["mlflow.parentRunId"] == outer
    assert data.tags["team"] == "qc" and data.tags["view"] == "SA" and data.tags["stage"] == "x"
    assert data.metrics == {"M_QC.dice": 0.5}  # non-finite values are not logged
    assert data.params == {"a.b": "1", "a.c": "[1, 2]"}
    assert runs["inner"].info.run_id == inner
    assert metric_key("fence.ED/pdc low") == "fence.ED/pdc low"


def test_demo_ablation_table_and_files_are_logged(in_workdir: Path) -> None:
    from qcloop.monitor.cli.demo_run import _log_demo

    out = in_workdir / "demo"
    out.mkdir()
    rows = [
        {"config": c, "vendor": "B", "view": "SA", "structure": "RV", "dice": d, "hd_mm": h}
        for c, d, h in (("M", 0.61, 12.5), ("M+QC", 0.66, 10.0), ("full", 0.72, 8.25))
    ]
    result = {"rows": rows, "meta": {"seconds": 42.0}}
    (out / "ablation.json").write_text(json.dumps(result))
    (out / "ablation.md").write_text("| config | dice |\n")
    (out / "dice.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    tracker = MlflowTracker(experiment="demo")
    with tracker.start_run("demo") as run_id:
        _log_demo(tracker, out, result)
    run = _client(tracker.tracking_uri).get_run(run_id)
    assert run.data.metrics["M_QC.B.SA.RV.dice"] == pytest.approx(0.66)
    assert run.data.metrics["full.B.SA.RV.hd_mm"] == pytest.approx(8.25)
    assert run.data.metrics["seconds"] == 42.0
    assert _artifacts(tracker.tracking_uri, run_id) == {"ablation.json", "ablation.md", "figures"}
    assert _artifacts(tracker.tracking_uri, run_id, "figures") == {"figures/dice.png"}
