"""Online scoring of single cases against a run's reference fences (the monitor/serve path)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from qcloop.monitor.core.interfaces import Runtime
from qcloop.monitor.data import CaseError, discover, load_case
from qcloop.monitor.ops.scoring import OnlineScorer, load_online_scorers
from qcloop.monitor.ops.torch_runtime import TorchRuntime


def _finite(obj: object) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return True


def test_scores_one_case_per_view_on_its_original_grid(tiny_run: Path, tiny_cohort: Path) -> None:
    scorers = load_online_scorers(tiny_run)
    assert set(scorers) == {"SA", "LA"}
    for view, scorer in scorers.items():
        assert isinstance(scorer.runtime, Runtime)
        source = next(s for s in discover(tiny_cohort) if s.view == view)
        case = load_case(source)
        result = scorer.score(case)
        assert result.labels.shape == case.image.shape
        assert result.labels.dtype == np.uint8
        assert set(np.unique(result.labels)) <= {0, 1, 2, 3}
        rec = result.record
        assert rec["view"] == view and rec["subject"] == source.subject
        assert isinstance(rec["ood"], bool)
        assert rec["fences"] and rec["selection"]["kind"]
        assert rec["runtime"] == {"name": "torch", "providers": ["torch:cpu"]}
        assert rec["model"]["run"] == str(tiny_run.resolve())
        assert len(rec["candidates"]) == scorer.runtime.n_candidates
        assert _finite(rec)
        json.dumps(rec, allow_nan=False)
        assert result.timings_s["total"] >= result.timings_s["segment"] > 0


def test_matches_batch_assessment_with_reference_fences(tiny_run: Path, tiny_cohort: Path) -> None:
    """The online path gives the same record numbers as ``assess_run`` (reference population)."""
    from qcloop.monitor.method.assess import assess_run

    out = tiny_run.parent / "assess-online-check"
    assess_run(tiny_cohort, tiny_run, out, views=["SA"], where={"split": "test"})
    batch = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    scorer = load_online_scorers(tiny_run, ["SA"])["SA"]
    by_path = {str(s.image_path): s for s in discover(tiny_cohort)}
    for rec in batch[:3]:
        online = scorer.score(load_case(by_path[rec["image"]])).record
        assert online["ood"] == rec["ood"]
        assert online["selection"] == rec["selection"]
        for a, b in zip(online["candidates"], rec["candidates"], strict=True):
            assert a["RV"]["pdc"] == pytest.approx(b["RV"]["pdc"], abs=1e-6)


def test_wrong_view_and_missing_fences_are_clear_errors(tiny_run: Path, tiny_cohort: Path) -> None:
    from qcloop.monitor.method.run_folder import load_model_set, load_run_config

    cfg = load_run_config(tiny_run)
    model_set = load_model_set(tiny_run, "SA", cfg)
    scorer = OnlineScorer("SA", TorchRuntime(model_set, 64), model_set.fences, cfg)
    la = next(s for s in discover(tiny_cohort) if s.view == "LA")
    with pytest.raises(CaseError, match="LA case given to the SA scorer"):
        scorer.score(load_case(la))
    with pytest.raises(ValueError, match="no reference fences"):
        OnlineScorer("SA", TorchRuntime(model_set, 64), {}, cfg)
    with pytest.raises(ValueError, match="unknown runtime"):
        load_online_scorers(tiny_run, ["SA"], runtime="tensorflow")


def test_pose_normalisation_same_online_and_in_batch(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    """With ``assessment.pose_normalisation`` the run's recorded pose is used by batch
    assessment and by the online path alike, and it changes the scores; a run without a
    recorded pose is refused with the file named."""
    import shutil

    import yaml

    from qcloop.monitor.method.assess import assess_run
    from qcloop.monitor.method.run_folder import RunError

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("onnx", "training"))
    assert (run / "SA" / "pose.json").is_file()  # recorded by qcloop train
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["assessment"]["pose_normalisation"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assess_run(tiny_cohort, run, tmp_path / "posed", views=["SA"], where={"split": "test"})
    assess_run(tiny_cohort, tiny_run, tmp_path / "plain", views=["SA"], where={"split": "test"})
    posed, plain = (
        [json.loads(line) for line in (tmp_path / d / "records.jsonl").read_text().splitlines()]
        for d in ("posed", "plain")
    )
    pdc = [[c["RV"]["pdc"] for c in r["candidates"]] for r in posed]
    assert pdc != [[c["RV"]["pdc"] for c in r["candidates"]] for r in plain]
    scorer = load_online_scorers(run, ["SA"])["SA"]
    assert scorer.pose is not None
    by_path = {str(s.image_path): s for s in discover(tiny_cohort)}
    for rec in posed[:3]:
        online = scorer.score(load_case(by_path[rec["image"]])).record
        assert online["ood"] == rec["ood"] and online["selection"] == rec["selection"]
        for a, b in zip(online["candidates"], rec["candidates"], strict=True):
            assert a["RV"]["pdc"] == pytest.approx(b["RV"]["pdc"], abs=1e-6)
    (run / "SA" / "pose.json").unlink()
    with pytest.raises(RunError, match=r"SA/pose\.json"):
        load_online_scorers(run, ["SA"])
