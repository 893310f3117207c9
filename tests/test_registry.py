"""The MLflow model registry plugin against a real MLflow tracking server, driven by the core's
lifecycle (``qcloop.monitor.ops.promotion``): registration, the promotion gate, aliases by
``models:/`` spec, rollback, atomicity under a crash, the CLI and bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qcloop.monitor import hookimpl
from qcloop.monitor.cli.main import cli
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.events import ModelVersionPromoted, ModelVersionRegistered
from qcloop.monitor.core.plugin_manager import get_plugin_manager, reset_plugin_manager
from qcloop.monitor.core.resolve import build_model_registry
from qcloop.monitor.ops import promotion
from qcloop.monitor.ops import run_package as pkg
from qcloop.plugins.mlflow.registry import CACHE_ENV, REGISTRY_EXPERIMENT, MlflowRegistry
from tests.mlflow_server import MlflowServer, mlflow_server  # noqa: F401

#: The drift window: two subjects of shifted vendor B (small, so refinement takes seconds).
WINDOW = {"VENDOR": "B", "DISEASE": ["DRV", "NOR"]}


class Events:
    """A listener plugin recording the registry's events."""

    def __init__(self) -> None:
        self.registered: list[tuple[str, str]] = []
        self.promoted: list[tuple[str, str, str, str | None]] = []

    @hookimpl
    def on_model_version_registered(self, event: ModelVersionRegistered) -> None:
        self.registered.append((event.name, event.version))

    @hookimpl
    def on_model_version_promoted(self, event: ModelVersionPromoted) -> None:
        self.promoted.append((event.name, event.version, event.alias, event.previous_version))


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """A fresh plugin manager with the listener registered; downloads cached under tmp_path."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "model-cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reset_plugin_manager()
    listener = Events()
    get_plugin_manager().register(listener, name="test-listener")
    yield listener
    reset_plugin_manager()


@pytest.fixture
def prefix() -> str:
    """A registered-model prefix of its own for each test (the server is shared)."""
    return f"t{uuid.uuid4().hex[:8]}"


def _registry(uri: str, cache_dir: Path | None = None) -> MlflowRegistry:
    """The configured (default) registry backend at ``uri``: the plugin's MlflowRegistry."""
    params = {} if cache_dir is None else {"cache_dir": cache_dir}
    registry = build_model_registry(QcloopConfig(), uri=uri, **params)
    assert isinstance(registry, MlflowRegistry) and registry.uri == uri
    return registry


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("last.pt"))
    return dst


def _window(cohort: Path, dst: Path) -> Path:
    """A copy of the cohort's :data:`WINDOW` cases, in the same (M&Ms-2) layout."""
    with open(cohort / "dataset_information.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = [
        r for r in rows if r["VENDOR"] == WINDOW["VENDOR"] and r["DISEASE"] in WINDOW["DISEASE"]
    ]
    assert len(keep) == 2, f"expected two window subjects in {cohort}, got {keep}"
    dst.mkdir(parents=True)
    for r in keep:
        code = f"{int(r['SUBJECT_CODE']):03d}"
        shutil.copytree(cohort / code, dst / code)
    with open(dst / "dataset_information.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)
    return dst


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gate_rule(figures: dict[str, float], margin: float) -> bool:
    """The documented gate, recomputed from its figures."""
    qc = figures["challenger_ood"] < figures["champion_ood"] or (
        figures["challenger_ood"] == figures["champion_ood"]
        and figures["challenger_median_pdc"] > figures["champion_median_pdc"]
    )
    return qc and figures["challenger_val_dice"] >= figures["champion_val_dice"] - margin - 1e-12


def _config(run: Path, prefix: str, promotion: str, margin: float) -> Any:
    from qcloop.monitor.method.run_folder import load_run_config

    cfg = load_run_config(run)
    return cfg.model_copy(
        update={
            "registry": cfg.registry.model_copy(
                update={"name_prefix": prefix, "promotion": promotion, "dice_margin": margin}
            )
        }
    )


# --------------------------------------------------------------------------- the loop


@pytest.mark.slow
def test_refined_challenger_is_gated_promoted_loaded_and_rolled_back(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_run: Path,
    tiny_cohort: Path,
    tmp_path: Path,
    events: Events,
    prefix: str,
) -> None:
    from qcloop.monitor.data import discover, load_case
    from qcloop.monitor.method.refine import refine_run
    from qcloop.monitor.ops.scoring import load_online_scorers

    uri = mlflow_server.uri
    registry = _registry(uri)
    run = _copy_run(tiny_run, tmp_path / "run")
    champions = promotion.ensure_champion(registry, run, name_prefix=prefix)
    assert {v: r.version for v, r in champions.items()} == {"SA": "1", "LA": "1"}
    assert champions["SA"].aliases == ["champion"]
    # the run itself holds exactly this version: no download
    assert champions["SA"].run_dir.resolve() == run.resolve()
    # idempotent: the same run is found by its digest, nothing new is registered
    again = promotion.ensure_champion(registry, run, name_prefix=prefix)
    assert {v: r.version for v, r in again.items()} == {"SA": "1", "LA": "1"}
    assert sorted(events.registered) == [(f"{prefix}-LA", "1"), (f"{prefix}-SA", "1")]

    refined = tmp_path / "refined"
    refine_run(tiny_cohort, run, refined, views=["SA"], where=WINDOW)
    window = _window(tiny_cohort, tmp_path / "window")
    margin = 0.05
    cfg = _config(run, prefix, "auto", margin)
    result = promotion.register_and_gate(
        registry, refined, champions, cfg, window_dir=window, tags={"qcloop.trigger": "test"}
    )
    sa = result["SA"]
    gate = sa["gate"]
    figures = gate["figures"]
    assert sa["version"] == "2" and set(result) == {"SA"}
    assert all(math.isfinite(v) for v in figures.values())
    assert figures["window_cases"] == 4 and figures["val_cases"] > 0
    assert gate["passed"] == _gate_rule(figures, margin)
    assert gate["passed"], f"the refined SA set should pass its own window's gate: {gate}"
    assert sa["promoted"] is True
    assert (f"{prefix}-SA", "2") in events.registered
    assert events.promoted[-1] == (f"{prefix}-SA", "2", "champion", "1")

    # models:/PREFIX-SA@champion now loads the refined files
    refs = _registry(uri, tmp_path / "cache").resolve(f"{prefix}@champion")
    assert {v: r.version for v, r in refs.items()} == {"SA": "2", "LA": "1"}
    sa_ref = refs["SA"]
    assert sa_ref.run_dir.is_relative_to(tmp_path / "cache")
    for rel in json.loads((refined / "SA" / "candidates.json").read_text()):
        name = f"SA/{rel['path']}"
        assert _sha(sa_ref.run_dir / name) == _sha(refined / name)
    for name in (
        "SA/qc.pt",
        "SA/fences.json",
        "SA/pose.json",
        "SA/candidates.json",
        "config.yaml",
        "run.json",
    ):
        assert _sha(sa_ref.run_dir / name) == _sha(refined / name)
    assert sa_ref.tags[promotion.TAG_PARENT_VERSION] == "1"
    assert sa_ref.tags[promotion.TAG_GATE_PASSED] == "true"
    assert sa_ref.tags["qcloop.trigger"] == "test"
    assert sa_ref.tags["qcloop.data_window"] == str(tiny_cohort.resolve())
    assert sa_ref.tags["qcloop.window_cases"] == "4"
    single = registry.resolve(f"models:/{prefix}-SA@champion")
    assert single["SA"].version == "2"
    case = load_case(discover(window, views="SA")[0])
    scorer = load_online_scorers(sa_ref.run_dir, ["SA"], model_info=sa_ref.to_dict())["SA"]
    assert scorer.score(case).record["model"]["version"] == "2"
    assert registry.alias_versions(f"{prefix}@champion") == {"SA": "2", "LA": "1"}
    assert registry.alias_versions(f"{prefix}-SA@previous-champion") == {"SA": "1"}

    back = promotion.rollback(registry, f"{prefix}-SA").ref
    assert back.version == "1"
    assert events.promoted[-1] == (f"{prefix}-SA", "1", "champion", "2")
    assert registry.alias_versions(f"{prefix}@champion") == {"SA": "1", "LA": "1"}
    with pytest.raises(pkg.RegistryError, match="no previous champion"):
        promotion.rollback(registry, f"{prefix}-SA")

    listed = CliRunner().invoke(
        cli, ["models", "list", "--prefix", prefix, "--tracking-uri", uri, "--json"]
    )
    assert listed.exit_code == 0, listed.output
    rows = {(r["name"], r["version"]): r for r in json.loads(listed.output)}
    assert rows[(f"{prefix}-SA", "1")]["aliases"] == ["champion"]
    assert rows[(f"{prefix}-SA", "2")]["gate"]["passed"] is True
    assert rows[(f"{prefix}-SA", "2")]["tags"][promotion.TAG_ROLLED_BACK]
    promoted = CliRunner().invoke(
        cli, ["models", "promote", f"{prefix}-SA", "2", "--tracking-uri", uri]
    )
    assert promoted.exit_code == 0, promoted.output
    assert registry.alias_versions(f"{prefix}-SA@champion") == {"SA": "2"}


def test_failed_gate_under_approve_waits_and_cli_refuses_without_force(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_run: Path,
    tiny_cohort: Path,
    tmp_path: Path,
    events: Events,
    prefix: str,
) -> None:
    uri = mlflow_server.uri
    registry = _registry(uri)
    run = _copy_run(tiny_run, tmp_path / "run")
    champions = promotion.ensure_champion(registry, run, name_prefix=prefix)
    # the champion's own files as challenger: equal OoD counts and median pDC, so QC fails
    same = _copy_run(tiny_run, tmp_path / "same")
    window = _window(tiny_cohort, tmp_path / "window")
    cfg = _config(run, prefix, "approve", 0.01)
    result = promotion.register_and_gate(
        registry, same, {"SA": champions["SA"]}, cfg, window_dir=window, tags={}
    )
    gate = result["SA"]["gate"]
    assert gate["passed"] is False and result["SA"]["promoted"] is False
    assert gate["figures"]["challenger_ood"] == gate["figures"]["champion_ood"]
    assert gate["figures"]["val_dice_drop"] == pytest.approx(0.0, abs=1e-12)
    assert any("fails" in r for r in gate["reasons"])
    assert registry.alias_versions(f"{prefix}-SA@champion") == {"SA": "1"}
    assert registry.alias_versions(f"{prefix}-SA@challenger") == {"SA": "2"}
    assert not [p for p in events.promoted if p[1] == "2"]

    args = ["models", "promote", f"{prefix}-SA", "2", "--tracking-uri", uri]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code != 0
    assert "failed the promotion gate" in refused.output
    assert registry.alias_versions(f"{prefix}-SA@champion") == {"SA": "1"}
    forced = CliRunner().invoke(cli, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert registry.alias_versions(f"{prefix}-SA@champion") == {"SA": "2"}
    assert registry.alias_versions(f"{prefix}-SA@previous-champion") == {"SA": "1"}
    # the challenger alias went with the promotion
    with pytest.raises(pkg.RegistryError, match="no version carries alias 'challenger'"):
        registry.alias_versions(f"{prefix}-SA@challenger")


# --------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("crash_in", ["create_model_version", "set_registered_model_alias"])
def test_a_crash_before_the_alias_leaves_it_on_the_old_version(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_run: Path,
    tmp_path: Path,
    events: Events,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    crash_in: str,
) -> None:
    from mlflow import MlflowClient

    uri = mlflow_server.uri
    registry = _registry(uri)
    run = _copy_run(tiny_run, tmp_path / "run")
    promotion.register(registry, run, name_prefix=prefix, alias="champion", views=["SA"])
    (run / "SA" / "qc.pt").write_bytes((run / "SA" / "qc.pt").read_bytes() + b"\0")  # new content

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"simulated crash in {crash_in}")

    with monkeypatch.context() as patched, pytest.raises(RuntimeError, match="simulated crash"):
        patched.setattr(MlflowClient, crash_in, crash)
        promotion.register(registry, run, name_prefix=prefix, alias="champion")

    assert registry.alias_versions(f"{prefix}@champion") == {"SA": "1"}
    refs = _registry(uri, tmp_path / "c").resolve(f"{prefix}@champion")
    assert _sha(refs["SA"].run_dir / "SA" / "qc.pt") == _sha(tiny_run / "SA" / "qc.pt")
    client = MlflowClient(uri, uri)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{prefix}-SA'"))
    # a version created before the crash is complete (READY, tagged) but carries no alias
    assert versions == ([1] if crash_in == "create_model_version" else [1, 2])
    if crash_in == "set_registered_model_alias":
        v2 = client.get_model_version(f"{prefix}-SA", "2")
        assert v2.status == "READY" and v2.tags[pkg.TAG_DIGEST] == pkg.run_digest(run, "SA")
    exp = client.get_experiment_by_name(REGISTRY_EXPERIMENT)
    statuses = [r.info.status for r in client.search_runs([exp.experiment_id])]
    if crash_in == "create_model_version":
        assert "FAILED" in statuses


# --------------------------------------------------------------------------- bad input


def test_bad_specs_aliases_and_folders_are_clear_errors(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_run: Path,
    tmp_path: Path,
    events: Events,
    prefix: str,
) -> None:
    uri = mlflow_server.uri
    registry = _registry(uri)
    run = _copy_run(tiny_run, tmp_path / "run")
    promotion.register(registry, run, name_prefix=prefix, alias="champion", views=["SA"])
    cases = {
        "not a spec!": "expected PREFIX@ALIAS",
        f"{prefix}/1": "a version needs one model's name",
        f"{prefix}@staging": "no version carries alias 'staging'",
        f"{prefix}-SA/7": "has no version '7'",
        f"{prefix}-LA@champion": f"no registered model '{prefix}-LA'",
        "nobody@champion": "no registered model 'nobody-SA' or 'nobody-LA'",
    }
    for spec, message in cases.items():
        with pytest.raises(pkg.RegistryError, match=message):
            registry.resolve(spec)
    with pytest.raises(pkg.RegistryError, match="no previous champion"):
        promotion.rollback(registry, f"{prefix}-SA")
    with pytest.raises(pkg.RegistryError, match="no registered model 'nobody-SA'"):
        promotion.promote(registry, "nobody-SA", "1")

    (tmp_path / "empty").mkdir()
    with pytest.raises(pkg.RegistryError, match=r"config.yaml: missing - .* not a qcloop run"):
        promotion.register(registry, tmp_path / "empty", name_prefix="qcloop")
    broken = _copy_run(tiny_run, tmp_path / "broken")
    (broken / "SA" / "qc.pt").unlink()
    with pytest.raises(pkg.RegistryError, match=r"SA/qc.pt: missing file of the SA model set"):
        promotion.register(registry, broken, name_prefix="qcloop", views=["SA"])
    with pytest.raises(pkg.RegistryError, match="unknown view 'XX'"):
        promotion.register(registry, run, name_prefix="qcloop", views=["XX"])

    result = CliRunner().invoke(cli, ["models", "rollback", "nobody-SA", "--tracking-uri", uri])
    assert result.exit_code != 0 and "no registered model 'nobody-SA'" in result.output


# --------------------------------------------------------------------------- load by alias


def test_predict_and_assess_load_the_registered_champion_by_alias(
    mlflow_server: MlflowServer,  # noqa: F811
    tiny_run: Path,
    tiny_cohort: Path,
    tmp_path: Path,
    events: Events,
    prefix: str,
) -> None:
    uri = mlflow_server.uri
    registry = _registry(uri)
    run = _copy_run(tiny_run, tmp_path / "run")
    promotion.register(registry, run, name_prefix=prefix, alias="champion")
    data = _window(tiny_cohort, tmp_path / "window")
    out = tmp_path / "pred"
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            "--data",
            str(data),
            "--model",
            f"{prefix}@champion",
            "--tracking-uri",
            uri,
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["view"] for r in records} == {"SA", "LA"}
    for r in records:
        assert r["model"]["name"] == f"{prefix}-{r['view']}" and r["model"]["version"] == "1"
        assert Path(r["mask"]).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"SA", "LA"}
    # the same command with a run folder gives the same flags and selections
    out_run = tmp_path / "pred-run"
    result = CliRunner().invoke(
        cli, ["assess", "--data", str(data), "--run", str(run), "--out", str(out_run)]
    )
    assert result.exit_code == 0, result.output
    by_run = [json.loads(line) for line in (out_run / "records.jsonl").read_text().splitlines()]
    assert [(r["ood"], r["selection"]) for r in by_run] == [
        (r["ood"], r["selection"]) for r in records
    ]
    bad = CliRunner().invoke(
        cli, ["predict", "--data", str(data), "--run", str(run), "--model", "x@y", "--out", "o"]
    )
    assert bad.exit_code != 0 and "exactly one of --run RUN or --model" in bad.output
    missing = CliRunner().invoke(
        cli,
        [
            "assess",
            "--data",
            str(data),
            "--model",
            f"{prefix}@nope",
            "--tracking-uri",
            uri,
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert missing.exit_code != 0 and "nope" in missing.output
