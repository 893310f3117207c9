"""Configuration: defaults, schema, error reports with paths and lines, component names, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from qcloop.monitor import hookimpl
from qcloop.monitor.cli.main import cli
from qcloop.monitor.core import plugin_manager as plugins_module
from qcloop.monitor.core.config import (
    ComponentConfig,
    ConfigError,
    QcloopConfig,
    check_components,
    config_schema,
    dump_config,
    load_config,
    override_config,
    parse_config,
    save_config,
)
from qcloop.monitor.core.plugin_manager import QcloopPluginManager, make_plugin_manager

SECTIONS = {
    "plugins",
    "seed",
    "views",
    "preprocessing",
    "segmenter",
    "training",
    "qc",
    "assessment",
    "refinement",
    "tracking",
    "registry",
    "monitoring",
    "serving",
}

#: The default configuration as specified (written out by hand, not produced by the code).
EXPECTED_DEFAULT: dict[str, Any] = {
    "seed": 0,
    "views": ["SA", "LA"],
    "preprocessing": {"size": 128, "target_spacing_mm": 1.8, "normalisation": "zscore"},
    "segmenter": {"name": "bn1", "params": {}},
    "training": {
        "epochs": 30,
        "batch_size": 8,
        "m_best": 3,
        "val_every": 1,
        "augmentation": {"flip": True, "rotation_deg": 15.0, "scale": [0.85, 1.15]},
        "max_slices_per_epoch": None,
        "lr": None,
        "checkpoint_gap": 1,
        "min_steps": 0,
    },
    "qc": {
        "module": {"name": "autoencoder", "params": {}},
        "input": "softmax",
        "epochs": 40,
        "batch_size": 16,
        "min_steps": 600,
    },
    "assessment": {
        "decision_structure": "RV",
        "hd_units": "mm",
        "thresholds": {"name": "iqr", "params": {"k": 1.5}},
        "population": "reference",
        "pose_normalisation": False,
        "flag_on": "fences",
        "est_flag_dice": 0.8,
    },
    "refinement": {"refiner": {"name": "alpha", "params": {}}},
    "tracking": {"tracker": None},
    "registry": {
        "backend": {"name": "mlflow", "params": {}},
        "uri": None,
        "name_prefix": "qcloop",
        "promotion": "approve",
        "dice_margin": 0.01,
    },
    "monitoring": {
        "window": 50,
        "min_cases": 10,
        "drift_rule": "binomial",
        "alert_alpha": 0.01,
        "ood_fraction_limit": 0.3,
        "median_pdc_shift_limit": 0.1,
        "drift_score": "pdc",
        "min_median_est_dice": 0.8,
        "refine_on_alert": True,
        "http_host": "127.0.0.1",
        "http_port": 9308,
        "webhook_secret_env": "QCLOOP_WEBHOOK_SECRET",
    },
    "serving": {
        "runtime": "onnxruntime",
        "max_upload_mb": 64.0,
        "max_inplane": 1024,
        "max_slices": 64,
        "upload_timeout_s": 30.0,
        "max_concurrency": 2,
        "queue_size": 8,
        "api_key_file": None,
        "reload_poll_s": 30.0,
    },
    "plugins": {"block": []},
}


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.yaml")
    assert info.value.source == "test.yaml"
    return info.value.problems


def _stub_pm() -> QcloopPluginManager:
    """A plugin manager with one stub plugin registering every default component name."""

    class Stub:
        @hookimpl
        def register_segmenters(self, register: Any) -> None:
            register("bn1", dict)
            register("stubnet", dict)

        @hookimpl
        def register_qc_modules(self, register: Any) -> None:
            register("autoencoder", dict)

        @hookimpl
        def register_threshold_strategies(self, register: Any) -> None:
            register("iqr", dict)

        @hookimpl
        def register_refiners(self, register: Any) -> None:
            register("alpha", dict)

        @hookimpl
        def register_trackers(self, register: Any) -> None:
            register("mlflow", dict)

        @hookimpl
        def register_runtimes(self, register: Any) -> None:
            register("onnxruntime", dict)

        @hookimpl
        def register_model_registries(self, register: Any) -> None:
            register("mlflow", dict)

    pm = make_plugin_manager(load_entrypoints=False, builtins=False)
    pm.register(Stub(), name="stub")
    return pm


# --------------------------------------------------------------------------- defaults


def test_default_config_matches_the_specification() -> None:
    assert load_config(None).model_dump(mode="json") == EXPECTED_DEFAULT
    assert parse_config("") == QcloopConfig()
    assert parse_config("# only a comment\n") == QcloopConfig()


def test_dump_and_parse_round_trip(tmp_path: Path) -> None:
    cfg = parse_config("training: {epochs: 5, augmentation: {scale: [0.9, 1.1]}}\nviews: [LA]\n")
    assert parse_config(dump_config(cfg)) == cfg
    assert yaml.safe_load(dump_config(QcloopConfig())) == EXPECTED_DEFAULT
    target = save_config(cfg, tmp_path / "cfg.yaml")
    assert load_config(target) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["cfg.yaml"]  # no temporary left behind


def test_partial_sections_keep_the_other_defaults() -> None:
    cfg = parse_config("training:\n  epochs: 5\nassessment:\n  thresholds: {name: mad}\n")
    assert cfg.training.epochs == 5
    assert cfg.training.batch_size == 8
    assert cfg.training.augmentation.scale == (0.85, 1.15)
    assert cfg.assessment.thresholds == ComponentConfig(name="mad", params={})
    assert cfg.assessment.decision_structure == "RV"


# --------------------------------------------------------------------------- schema


def test_schema_is_json_with_every_section() -> None:
    schema = json.loads(json.dumps(config_schema()))
    assert set(schema["properties"]) == SECTIONS
    assert schema["additionalProperties"] is False
    for name, definition in schema["$defs"].items():
        assert definition.get("additionalProperties") is False, name
    result = CliRunner().invoke(cli, ["config", "schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == schema


# --------------------------------------------------------------------------- error reports


def test_every_error_is_reported_with_its_path_and_line() -> None:
    text = (
        "seed: -1\n"  # line 1
        "views: [SA, XA]\n"  # 2
        "preprocessing:\n"  # 3
        "  size: 100\n"  # 4
        "  target_spacing_mm: 0\n"  # 5
        "training:\n"  # 6
        "  epochs: 0\n"  # 7
        "  epoch: 3\n"  # 8
        "  augmentation: {scale: [1.2, 0.9]}\n"  # 9
        "qc: {input: logits}\n"  # 10
        "refinement: {refiner: {name: alpha, parms: {}}}\n"  # 11
    )
    assert _problems(text) == [
        "seed: Input should be greater than or equal to 0 (line 1)",
        "views[1]: Input should be 'SA' or 'LA' (line 2)",
        "preprocessing.size: Value error, must be a multiple of 16, got 100 (line 4)",
        "preprocessing.target_spacing_mm: Input should be greater than 0 (line 5)",
        "training.epochs: Input should be greater than 0 (line 7)",
        "training.epoch: Extra inputs are not permitted (line 8)",
        "training.augmentation.scale: Value error, must satisfy 0 < low <= high, got [1.2, 0.9]"
        " (line 9)",
        "qc.input: Input should be 'softmax' or 'onehot' (line 10)",
        "refinement.refiner.parms: Extra inputs are not permitted (line 11)",
    ]


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("views: []\n", "views"),
        ("views: [SA, SA]\n", "views"),
        ("preprocessing: {size: 0}\n", "preprocessing.size"),
        ("preprocessing: {normalisation: minmax}\n", "preprocessing.normalisation"),
        ("training: {m_best: 0}\n", "training.m_best"),
        ("training: {lr: -0.1}\n", "training.lr"),
        ("training: {epochs: 2.5}\n", "training.epochs"),
        ("assessment: {decision_structure: LA}\n", "assessment.decision_structure"),
        ("assessment: {hd_units: cm}\n", "assessment.hd_units"),
        ("assessment: {population: everything}\n", "assessment.population"),
        ("segmenter: {params: {}}\n", "segmenter.name"),
        ("tracking: {tracker: mlflow}\n", "tracking.tracker"),
        ("typo_section: 1\n", "typo_section"),
    ],
)
def test_single_errors_name_their_path(text: str, path: str) -> None:
    problems = _problems(text)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: ")
    assert problems[0].endswith("(line 1)")


def test_yaml_syntax_error_reports_its_line() -> None:
    problems = _problems("seed: 1\ntraining:\n  epochs: [1, 2\n  batch_size: 3\n")
    assert len(problems) == 1
    assert problems[0].startswith("line 4, column 13: YAML syntax error")
    assert "line 3" in problems[0]  # where the unclosed sequence began
    (bad_indent,) = _problems("seed: 1\nviews: [SA]\n  qc: 2\n")
    assert bad_indent.startswith("line 3, column 3: YAML syntax error")


@pytest.mark.parametrize(("text", "kind"), [("- seed\n", "list"), ("42\n", "int")])
def test_top_level_must_be_a_mapping(text: str, kind: str) -> None:
    assert _problems(text) == [f"(top level): expected a mapping of sections, got {kind}"]


def test_repeated_key_is_an_error() -> None:
    assert _problems("training:\n  epochs: 3\n  epochs: 4\n") == [
        "training.epochs: duplicate key (line 3)"
    ]


def test_code_execution_tags_are_refused() -> None:
    (problem,) = _problems("seed: !!python/object/apply:os.getcwd []\n")
    assert "YAML syntax error" in problem
    assert "line 1" in problem


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- components


def test_check_components_accepts_registered_names() -> None:
    pm = _stub_pm()
    assert check_components(QcloopConfig(), pm) == []
    cfg = parse_config("tracking: {tracker: {name: mlflow}}\n")
    assert check_components(cfg, pm) == []


def test_check_components_reports_unknown_names() -> None:
    cfg = parse_config(
        "segmenter: {name: bn3}\nassessment: {thresholds: {name: mad}}\n"
        "tracking: {tracker: {name: wandb}}\n"
    )
    assert check_components(cfg, _stub_pm()) == [
        "segmenter.name: unknown segmenter 'bn3' (available: bn1, stubnet)",
        "assessment.thresholds.name: unknown threshold strategy 'mad' (available: iqr)",
        "tracking.tracker.name: unknown tracker 'wandb' (available: mlflow)",
    ]


def test_check_components_reports_duplicates() -> None:
    class Again:
        @hookimpl
        def register_refiners(self, register: Any) -> None:
            register("alpha", dict)

    pm = _stub_pm()
    pm.register(Again(), name="again")
    (problem,) = check_components(QcloopConfig(), pm)
    assert problem.startswith("refinement.refiner.name: ")
    assert "'stub'" in problem and "'again'" in problem


# --------------------------------------------------------------------------- command line


@pytest.fixture
def stub_cli_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = _stub_pm()
    monkeypatch.setattr(plugins_module, "get_plugin_manager", lambda: pm)


def test_validate_command(tmp_path: Path, stub_cli_plugins: None) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("training: {epochs: 2}\n")
    result = CliRunner().invoke(cli, ["config", "validate", str(good)])
    assert (result.exit_code, result.output) == (0, f"{good}: valid\n")

    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: 0\n  batch: 4\n")
    result = CliRunner().invoke(cli, ["config", "validate", str(bad)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{bad}: 2 problems",
        "  training.epochs: Input should be greater than 0 (line 2)",
        "  training.batch: Extra inputs are not permitted (line 3)",
    ]

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("segmenter: {name: bn3}\n")
    result = CliRunner().invoke(cli, ["config", "validate", str(unknown)])
    assert result.exit_code == 1
    assert "segmenter.name: unknown segmenter 'bn3'" in result.output


def test_show_command(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 0
    assert yaml.safe_load(result.output) == EXPECTED_DEFAULT

    path = tmp_path / "cfg.yaml"
    path.write_text("qc: {epochs: 7}\n")
    result = CliRunner().invoke(cli, ["config", "show", str(path)])
    assert result.exit_code == 0
    expected = json.loads(json.dumps(EXPECTED_DEFAULT))
    expected["qc"]["epochs"] = 7
    assert yaml.safe_load(result.output) == expected

    path.write_text("qc: {epochs: -7}\n")
    result = CliRunner().invoke(cli, ["config", "show", str(path)])
    assert result.exit_code == 1
    assert "qc.epochs: Input should be greater than 0 (line 1)" in result.output


def test_override_config_merges_single_settings(tmp_path: Path) -> None:
    from qcloop.monitor.cli.demo_run import demo_config

    base = demo_config(quick=False)
    path = tmp_path / "over.yaml"
    path.write_text(
        "qc:\n  module: {params: {augment_rotation_deg: 45}}\n"
        "refinement: {refiner: {params: {k_semi: 3}}}\n"
    )
    cfg = override_config(base, path)
    assert cfg.qc.module.params == {**base.qc.module.params, "augment_rotation_deg": 45}
    assert cfg.refinement.refiner.params == {**base.refinement.refiner.params, "k_semi": 3}
    assert cfg.refinement.refiner.name == base.refinement.refiner.name
    assert cfg.segmenter == base.segmenter and cfg.preprocessing == base.preprocessing
    # another component: the demo's parameters of the old one are dropped
    path.write_text("refinement: {refiner: {name: blend, params: {epochs: 2}}}\n")
    cfg = override_config(base, path)
    assert cfg.refinement.refiner == ComponentConfig(name="blend", params={"epochs": 2})


def test_override_config_reports_the_file_problems(tmp_path: Path) -> None:
    from qcloop.monitor.cli.demo_run import demo_config

    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"training.epoch: Extra inputs .* \(line 2\)"):
        override_config(demo_config(quick=True), path)
    result = CliRunner().invoke(cli, ["demo", "--quick", "--config", str(path)])
    assert (
        result.exit_code != 0
        and "bad.yaml" in result.output
        and "training.epoch" in (result.output)
    )


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "docs" / "demo-options").glob("*.yaml"))
)
def test_demo_option_files_are_valid_overrides(path: Path) -> None:
    from qcloop.monitor.cli.demo_run import demo_config

    base = demo_config(quick=False)
    cfg = override_config(base, path)
    assert cfg != base  # each file changes something
    assert path.read_text().startswith(f"# qcloop demo --config docs/demo-options/{path.name}\n")


def test_configurations_before_0_2_still_load() -> None:
    """``refinement.k_semi`` became the alpha refiner's parameter and the fences' population a
    core setting; configurations (and run folders) written before still load the same."""
    old = parse_config(
        "assessment:\n  thresholds: {name: iqr, params: {k: 1.5, population: transductive}}\n"
        "refinement: {refiner: {name: alpha, params: {lr: 0.001}}, k_semi: 2}\n"
    )
    assert old.assessment.population == "transductive"
    assert old.refinement.refiner.params == {"lr": 0.001, "k_semi": 2}
    default = parse_config("refinement: {k_semi: 5}\n")  # the old default: the refiner's own
    assert default.refinement.refiner.params == {}
    kept = parse_config("refinement: {refiner: {name: alpha, params: {k_semi: 4}}, k_semi: 2}\n")
    assert kept.refinement.refiner.params == {"k_semi": 4}  # params won before, as now


def test_run_folders_written_with_the_separate_metrics_and_webhook_servers_still_load() -> None:
    """Run configurations saved before /metrics and the webhook shared one endpoint name
    ``metrics_host``, ``metrics_port`` and ``webhook_host``: they read as the endpoint's."""
    old = {"metrics_host": "127.0.0.1", "metrics_port": 9400, "webhook_host": "127.0.0.1"}
    m = QcloopConfig.model_validate({"monitoring": old}).monitoring
    assert (m.http_host, m.http_port) == ("127.0.0.1", 9400)
    # a webhook that listened on every interface: so must the one endpoint
    pod = {"metrics_host": "127.0.0.1", "metrics_port": 0, "webhook_host": "0.0.0.0"}
    m = QcloopConfig.model_validate({"monitoring": pod}).monitoring
    assert (m.http_host, m.http_port) == ("0.0.0.0", 0)
    # the new names win over the old where a file has both
    both = {"metrics_port": 1, "http_port": 2}
    assert QcloopConfig.model_validate({"monitoring": both}).monitoring.http_port == 2
