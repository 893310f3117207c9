"""``qcloop export-onnx``: layout, parity figures, metadata, dynamic axes, failure, tracking."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from qcloop.deploy.onnx import export as onnx_export
from qcloop.deploy.onnx.convert import read_metadata
from qcloop.deploy.onnx.errors import ExportError
from qcloop.deploy.onnx.parity_data import parity_slices
from qcloop.monitor import hookimpl
from qcloop.monitor.cli.main import cli
from qcloop.monitor.core.plugin_manager import get_plugin_manager, reset_plugin_manager

ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class RecordingTracker:
    """A tracker that remembers every call."""

    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls

    def start_run(self, name: str, tags: dict[str, str] | None = None) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def run() -> Any:
            self.calls.append(("start_run", (name, dict(tags or {}))))
            yield self
            self.calls.append(("end_run", name))

        return run()

    def log_params(self, params: dict[str, Any]) -> None:
        self.calls.append(("log_params", dict(params)))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append(("log_metrics", dict(metrics)))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.calls.append(("log_artifact", (path, artifact_path, Path(path).is_dir())))


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of ``tiny_run`` with a recording tracker configured, exported to the default
    folder RUN/onnx through the command line."""
    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(tiny_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["tracking"] = {"tracker": {"name": "recording-test", "params": {}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    calls: list[tuple[str, Any]] = []

    class Plugin:
        @hookimpl
        def register_trackers(self, register: Any) -> None:
            register("recording-test", lambda: RecordingTracker(calls))

    reset_plugin_manager()
    get_plugin_manager().register(Plugin(), name="recording-test-plugin")
    try:
        result = CliRunner().invoke(cli, ["export-onnx", "--run", str(run)])
    finally:
        reset_plugin_manager()
    return {"run": run, "out": run / "onnx", "result": result, "calls": calls}


def test_export_writes_every_model_with_parity_figures(
    exported: dict[str, Any], tiny_cohort: Path
) -> None:
    result, out, run = exported["result"], exported["out"], exported["run"]
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["views"]) == {"SA", "LA"}
    assert isinstance(manifest["opset"], int) and manifest["opset"] >= 13
    assert {"torch", "onnx", "onnxruntime", "qcloop"} <= set(manifest["versions"])
    for view, entry in manifest["views"].items():
        listed = json.loads((run / view / "candidates.json").read_text())
        assert [c["epoch"] for c in entry["candidates"]] == [c["epoch"] for c in listed]
        assert [c["file"] for c in entry["candidates"]] == [
            f"{view}/candidate-{i}.onnx" for i in range(len(listed))
        ]
        assert entry["qc"]["file"] == f"{view}/qc.onnx"
        # each candidate file holds its own weights (the graph is converted once per view)
        assert len({c["sha256"] for c in entry["candidates"]}) == len(listed)
        data = entry["parity_data"]
        assert data["source"] == "run-data"
        assert Path(data["path"]).resolve() == tiny_cohort.resolve()
        assert data["slices"] >= 4 and data["cases"]
        for model in [*entry["candidates"], entry["qc"]]:
            parity = model["parity"]
            assert parity["max_abs_diff"] >= 0.0 and parity["max_excess"] <= 0.0
            assert parity["argmax_agreement"] >= 0.9999
            assert parity["passed"] is True
            path = out / model["file"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == model["sha256"]
    assert "parity ok" in result.output
    json.dumps(manifest, allow_nan=False)
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_models_carry_metadata(exported: dict[str, Any]) -> None:
    out, run = exported["out"], exported["run"]
    manifest = json.loads((out / "manifest.json").read_text())
    for view, entry in manifest["views"].items():
        listed = json.loads((run / view / "candidates.json").read_text())
        for index, cand in enumerate(entry["candidates"]):
            meta = read_metadata(out / cand["file"])
            assert meta["view"] == view and meta["role"] == "segmenter"
            assert json.loads(meta["labels"]) == {
                "0": "background",
                "1": "LV",
                "2": "MYO",
                "3": "RV",
            }
            assert meta["input_size"] == "64" and meta["spacing_mm"] == "4.0"
            assert meta["divisor"] == "8"
            assert meta["candidate_index"] == str(index)
            assert int(meta["epoch"]) == listed[index]["epoch"]
            assert float(meta["val_dice"]) == pytest.approx(listed[index]["val_dice"])
            assert meta["softmax_applied"] == "false"
            assert meta["qcloop_version"] and meta["run"] == str(run.resolve())
        qc = read_metadata(out / entry["qc"]["file"])
        assert qc["role"] == "qc" and qc["softmax_applied"] == "true" and qc["view"] == view


def test_dynamic_batch_and_a_second_input_size(exported: dict[str, Any]) -> None:
    import torch

    from qcloop.monitor.method.run_folder import load_model_set

    out, run = exported["out"], exported["run"]
    model_set = load_model_set(run, "SA")
    options = ort.SessionOptions()
    seg = ort.InferenceSession(
        str(out / "SA/candidate-0.onnx"), options, providers=["CPUExecutionProvider"]
    )
    qc = ort.InferenceSession(str(out / "SA/qc.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    # batch 1 and 5 at the trained size; 96 px (a multiple of the divisor 8 and of the QC's 16)
    for batch, size in [(1, 64), (5, 64), (2, 96)]:
        x = rng.standard_normal((batch, 1, size, size)).astype(np.float32)
        (got,) = seg.run(None, {"image": x})
        with torch.inference_mode():
            want = model_set.best(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 4, size, size)
        assert np.abs(got - want).max() <= 1e-4
        probs = torch.softmax(torch.from_numpy(want), 1)
        (rec,) = qc.run(None, {"probabilities": probs.numpy()})
        with torch.inference_mode():
            ref = model_set.qc.net(probs).numpy()
        assert rec.shape == (batch, 4, size, size)
        assert np.abs(rec - ref).max() <= 1e-4


def test_tracker_receives_the_export_and_parity_figures(exported: dict[str, Any]) -> None:
    calls, out = exported["calls"], exported["out"]
    names = [c[0] for c in calls]
    assert names[0] == "start_run" and names[-1] == "end_run"
    run_name, tags = calls[0][1]
    assert run_name == "export-onnx" and tags["qcloop.views"] == "SA,LA"
    artifacts = [c[1] for c in calls if c[0] == "log_artifact"]
    assert artifacts == [(str(out), "onnx", True)]
    metrics = next(c[1] for c in calls if c[0] == "log_metrics")
    assert metrics["parity.SA.candidate-0.argmax_agreement"] >= 0.9999
    assert metrics["parity.LA.qc.max_abs_diff"] <= 1e-4


def test_broken_export_fails_and_leaves_no_model(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A converter that gets one weight wrong is caught by the parity check; nothing is left."""
    from onnx import numpy_helper

    real = onnx_export.to_onnx

    def broken(*args: Any, **kwargs: Any) -> Any:
        proto = real(*args, **kwargs)
        for init in proto.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.dtype == np.float32 and array.ndim == 4:  # a conv kernel
                init.CopyFrom(numpy_helper.from_array(array + 0.5, init.name))
                break
        return proto

    monkeypatch.setattr(onnx_export, "to_onnx", broken)
    out = tmp_path / "exports" / "onnx"
    args = ["export-onnx", "--run", str(tiny_run), "--out", str(out), "--view", "SA"]
    # the fast legacy exporter: this test is about the parity check, not the conversion
    result = CliRunner().invoke(cli, [*args, "--exporter", "torchscript"])
    assert result.exit_code != 0
    assert "parity check failed" in result.output and "SA/candidate-0.onnx" in result.output
    assert not out.exists()
    assert list(tmp_path.rglob("*.onnx")) == []
    assert list((tmp_path / "exports").iterdir()) == []  # no staging folder left behind


def test_parity_data_sources(tiny_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    from qcloop.monitor.method.cases import make_preprocessor
    from qcloop.monitor.method.run_folder import load_run_config

    pre = make_preprocessor(load_run_config(tiny_run), 8)
    phantoms = parity_slices("SA", pre, run_data=tmp_path / "gone", data=None, max_cases=2)
    assert phantoms.source == "phantoms-in-memory" and phantoms.path is None
    assert phantoms.images.shape[1:] == (64, 64) and len(phantoms.images) > 4
    assert np.isfinite(phantoms.images).all() and phantoms.images.std() > 0.1
    la = parity_slices("LA", pre, run_data=None, data=None, max_cases=2)
    assert la.source == "phantoms-in-memory" and len(la.images) >= 4
    given = parity_slices("SA", pre, run_data=None, data=tiny_cohort, max_cases=2)
    assert given.source == "data-option" and len(given.cases) == 2
    with pytest.raises(ExportError, match="not a folder"):
        parity_slices("SA", pre, run_data=None, data=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no cases found"):
        parity_slices("SA", pre, run_data=None, data=tmp_path / "empty")


def test_bad_runs_and_outputs_are_clear_errors(tiny_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["export-onnx", "--run", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "config.yaml" in result.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = runner.invoke(cli, ["export-onnx", "--run", str(tiny_run), "--out", str(busy)])
    assert result.exit_code != 0 and "refusing to replace" in result.output
    assert (busy / "notes.txt").read_text() == "mine"


def test_a_missing_extra_is_named(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the onnx extra were missing
    for command in ("export-onnx", "export-triton"):
        result = CliRunner().invoke(cli, [command, "--run", str(tiny_run), "--out", "unused"])
        assert result.exit_code != 0
        assert f"qcloop {command} needs the 'onnx' extra" in result.output
        assert "pip install 'qcloop[onnx]'" in result.output


def test_parity_allows_for_the_scale_of_the_outputs() -> None:
    """As numpy.allclose: rounding that grows with the logits' magnitude (relative 4e-6, above
    1e-4 absolute on logits near 90, the case of `qcloop demo --quick`'s model) passes, the
    same absolute error on outputs near 0 does not, and a segmenter's probabilities are
    compared too."""
    import onnx
    from onnx import TensorProto, helper

    from qcloop.deploy.onnx.errors import ParityError
    from qcloop.deploy.onnx.parity import ParityTolerance, check_parity

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    payload = model.SerializeToString()
    onnx.checker.check_model(model)
    rng = np.random.default_rng(0)
    big = (30 * rng.standard_normal((3, 4, 8, 8))).astype(np.float32)
    figures, _ = check_parity("m", payload, lambda b: b * (1 + 4e-6), big, logits=True)
    assert figures["max_abs_diff"] > 1e-4 and figures["max_excess"] <= 0
    assert figures["max_prob_diff"] < 1e-4
    small = (1e-3 * rng.standard_normal((3, 4, 8, 8))).astype(np.float32)
    with pytest.raises(ParityError, match="exceeded by"):
        check_parity("m", payload, lambda b: b + 1.14e-4, small)
    loose = ParityTolerance(atol=1e-3)
    assert check_parity("m", payload, lambda b: b + 1.14e-4, small, loose)[0]["passed"]
