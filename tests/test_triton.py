"""``qcloop export-triton``: the model repository and its configs against Triton's schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from qcloop.deploy.triton.check import check_repository
from qcloop.deploy.triton.configs import onnx_model_config
from qcloop.deploy.triton.errors import TritonError
from qcloop.deploy.triton.schema import (
    ENUMS,
    MODEL_CONFIG_SCHEMA,
    parse_model_config,
    validate_model_config,
)
from qcloop.monitor.cli.main import cli

ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODELS = {"sa_candidate_0", "sa_candidate_1", "sa_segmenter_probs", "sa_qc", "sa_qc_ensemble"}


@pytest.fixture(scope="module")
def repo(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Triton repository of the SA models of ``tiny_run``, exported afresh by the command."""
    out = tmp_path_factory.mktemp("triton") / "repo"
    args = ["export-triton", "--run", str(tiny_run), "--out", str(out), "--view", "SA"]
    result = CliRunner().invoke(cli, [*args, "--max-batch", "8"])
    assert result.exit_code == 0, result.output
    return out


def _config(repo: Path, name: str) -> Any:
    return validate_model_config((repo / name / "config.pbtxt").read_text(), name)


def test_repository_layout_and_every_config_matches_the_schema(repo: Path) -> None:
    assert {p.name for p in repo.iterdir() if p.is_dir()} == MODELS
    for name in MODELS:
        config = _config(repo, name)
        assert config.name == name
        assert config.max_batch_size == 8
        version = repo / name / "1"
        assert version.is_dir()
        if name != "sa_qc_ensemble":
            assert config.platform == "onnxruntime_onnx"
            assert (version / "model.onnx").is_file()
            assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
            assert [g.kind for g in config.instance_group] == [
                ENUMS["InstanceGroupKind"].index("KIND_GPU")
            ]
            assert all(t.data_type == ENUMS["DataType"].index("TYPE_FP32") for t in config.input)
    assert check_repository(repo) == []
    summary = json.loads((repo / "qcloop-repository.json").read_text())
    assert set(summary["models"]) == MODELS


def test_ensemble_steps_match_the_models(repo: Path) -> None:
    ensemble = _config(repo, "sa_qc_ensemble")
    assert ensemble.platform == "ensemble"
    steps = list(ensemble.ensemble_scheduling.step)
    assert [s.model_name for s in steps] == ["sa_segmenter_probs", "sa_qc"]
    produced = {t.name for t in ensemble.input}
    for step in steps:
        model = _config(repo, step.model_name)
        assert set(step.input_map) == {t.name for t in model.input}
        assert set(step.output_map) <= {t.name for t in model.output}
        assert set(step.input_map.values()) <= produced
        produced |= set(step.output_map.values())
        session = ort.InferenceSession(
            str(repo / step.model_name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        assert {i.name for i in session.get_inputs()} == set(step.input_map)
        assert set(step.output_map) <= {o.name for o in session.get_outputs()}
    assert {t.name for t in ensemble.output} <= produced


def test_softmax_variant_gives_the_probabilities_of_the_best_candidate(repo: Path) -> None:
    opts = ort.SessionOptions()
    logits = ort.InferenceSession(str(repo / "sa_candidate_0/1/model.onnx"), opts)
    probs = ort.InferenceSession(str(repo / "sa_segmenter_probs/1/model.onnx"), opts)
    x = np.random.default_rng(3).standard_normal((3, 1, 64, 64)).astype(np.float32)
    (z,) = logits.run(None, {"image": x})
    (p,) = probs.run(None, {"image": x})
    e = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(1, keepdims=True), atol=1e-6)
    meta = probs.get_modelmeta().custom_metadata_map
    assert meta["softmax_applied"] == "true" and meta["output_name"] == "probabilities"


def test_schema_check_rejects_bad_configs(repo: Path) -> None:
    good = (repo / "sa_candidate_0" / "config.pbtxt").read_text()
    bad = {
        "unknown field": good.replace("max_batch_size", "max_batch"),
        "unknown enum": good.replace("KIND_GPU", "KIND_TPU"),
        "wrong type": good.replace("count: 1", 'count: "one"'),
        "bad data type": good.replace("TYPE_FP32", "TYPE_FLOAT", 1),
        "oneof clash": good + 'ensemble_scheduling { step [ { model_name: "x" } ] }\n',
        "preferred > max": good.replace("max_batch_size: 8", "max_batch_size: 2"),
        "no name": good.replace('name: "sa_candidate_0"', ""),
    }
    for label, text in bad.items():
        with pytest.raises(TritonError):
            validate_model_config(text, label)
    parsed = parse_model_config(good)
    assert parsed.input[0].name == "image" and list(parsed.input[0].dims) == [1, 64, 64]
    # every table entry names a known type
    known = {"string", "bool", "int32", "int64", "uint32", "uint64", "float", "double"}
    for fields in MODEL_CONFIG_SCHEMA.values():
        for label, spec in fields.values():
            types = spec if label == "map" else (spec,)
            assert all(t in known or t in ENUMS or t in MODEL_CONFIG_SCHEMA for t in types)


def test_repository_check_catches_broken_ensembles(repo: Path, tmp_path: Path) -> None:
    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    path = broken / "sa_qc_ensemble" / "config.pbtxt"
    path.write_text(
        path.read_text().replace('value: "probabilities" }\n    }', 'value: "probs" }\n    }')
    )
    problems = check_repository(broken)
    # step 0 now produces "probs": the QC step's input and the ensemble output lose their source
    assert any("step 1 (sa_qc): input_map value 'probabilities'" in p for p in problems), problems
    assert any("output 'probabilities' is produced by no step" in p for p in problems), problems
    cfg = broken / "sa_qc" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "reconstruction"', 'name: "recon"'))
    problems = check_repository(broken)
    assert any("sa_qc: config outputs ['recon']" in p for p in problems), problems


def test_cpu_instances_and_bad_outputs(tiny_run: Path, tmp_path: Path) -> None:
    text = onnx_model_config(
        "m", [("image", [1, 64, 64])], [("logits", [4, 64, 64])], max_batch=3, kind="cpu"
    )
    config = validate_model_config(text)
    assert config.instance_group[0].kind == ENUMS["InstanceGroupKind"].index("KIND_CPU")
    assert list(config.dynamic_batching.preferred_batch_size) == [3]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["export-triton", "--out", str(busy), "--onnx", str(tmp_path)])
    assert result.exit_code != 0 and "manifest.json: missing" in result.output
    result = CliRunner().invoke(
        cli, ["export-triton", "--run", str(tiny_run), "--out", str(busy), "--onnx", str(tmp_path)]
    )
    assert result.exit_code != 0 and "exactly one of --run RUN and --onnx DIR" in result.output
    assert (busy / "keep.txt").read_text() == "mine"
