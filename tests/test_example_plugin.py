"""The outside plugin examples/qcloop-tent proves the plugin contract: its TENT refiner, its
conformal threshold strategy and its JSON-lines exporter replace the built-ins through
configuration alone, with the built-ins blocked, from ``qcloop train`` to ``qcloop monitor``.

Tests that need the package skip unless the distribution ``qcloop-tent`` is installed
(``pip install -e examples/qcloop-tent``); the documentation checks always run.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from qcloop.monitor.core import hookspecs
from qcloop.monitor.core.config import QcloopConfig, override_config, save_config
from qcloop.monitor.core.plugin_manager import BLOCK_PLUGINS_ENV, reset_plugin_manager
from tests.helpers import heart_slices, tiny_run_config
from tests.prom_servers import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "qcloop-tent"
INSTALL = "pip install -e examples/qcloop-tent"
EVENTS_ENV = "QCLOOP_TENT_EVENTS"
PROMETHEUS = "qcloop.plugins.prometheus.exporter"
#: The built-ins the example replaces; blocked, nothing can fall back on them.
BUILTINS = ("qcloop.plugins.thresholds", "qcloop.plugins.refiners")
#: alpha for the tiny cohort's 4 validation cases per view (an even split needs 3 at 0.5).
ALPHA = 0.5


def _installed() -> bool:
    try:
        importlib.metadata.distribution("qcloop-tent")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_tent = pytest.mark.skipif(
    not _installed(), reason=f"the example plugin qcloop-tent is not installed ({INSTALL})"
)

EVENT_HOOKS = sorted(
    name
    for name, spec in vars(hookspecs).items()
    if name.startswith("on_") and hasattr(spec, "qcloop_spec")
)


# --------------------------------------------------------------------------- documentation


def test_writing_plugins_quotes_the_package_verbatim() -> None:
    """Every code block of docs/writing-plugins.md headed by a file of the example is an exact
    excerpt of that file: the walk-through cannot drift from the package."""
    page = (ROOT / "docs" / "writing-plugins.md").read_text()
    quotes = re.findall(
        r"^`(examples/qcloop-tent/[^`]+)`:?\n\n```\w*\n(.*?)\n```", page, re.M | re.S
    )
    assert len(quotes) >= 6, "the walk-through should quote the package's files"
    for rel, block in quotes:
        source = (ROOT / rel).read_text()
        assert block in source, f"docs/writing-plugins.md: the block under {rel} is not in it"
    quoted = {rel for rel, _ in quotes}
    for path in (EXAMPLE / "src" / "qcloop_tent").glob("*.py"):
        if path.name != "__init__.py":
            assert str(path.relative_to(ROOT)) in quoted, f"{path.name} is never quoted"


def test_tent_demo_option_swaps_the_refiner_and_drops_alpha_options() -> None:
    from qcloop.monitor.cli.demo_run import demo_config

    path = ROOT / "docs" / "demo-options" / "tent.yaml"
    lines = path.read_text().splitlines()
    assert "pip install -e examples/qcloop-tent" in lines[1]
    cfg = override_config(demo_config(quick=False), path)
    assert cfg.refinement.refiner.name == "tent"
    assert not {"k_semi", "max_slices_per_epoch"} & set(cfg.refinement.refiner.params)


# --------------------------------------------------------------------------- conformal fences


@needs_tent
def test_conformal_false_alarm_rate_is_at_most_alpha() -> None:
    """On many calibration sets and new cases from one distribution, the fraction of new
    cases flagged stays at or below alpha (within sampling error), and near it."""
    from qcloop_tent.conformal import ConformalThresholds

    rng = np.random.default_rng(0)
    for alpha, n in ((0.1, 39), (0.2, 24)):
        strategy = ConformalThresholds(alpha=alpha)
        rates = []
        for _ in range(300):
            pdc, phd = rng.beta(8, 2, n + 200), rng.gamma(2.0, 3.0, n + 200)
            fences = strategy.fit(pdc[:n], phd[:n])
            flagged = [fences.is_outlier(p, h) for p, h in zip(pdc[n:], phd[n:], strict=True)]
            rates.append(np.mean(flagged))
        mean, se = float(np.mean(rates)), float(np.std(rates) / np.sqrt(len(rates)))
        assert mean <= alpha + 3 * se, (alpha, mean, se)
        assert mean >= 0.6 * alpha, (alpha, mean)  # a guarantee, not a fence that never fires


@needs_tent
def test_conformal_fences_round_trip_and_refuse_bad_input() -> None:
    from qcloop_tent.conformal import ConformalThresholds

    strategy = ConformalThresholds(alpha=0.2)
    pdc = [0.9, 0.85, 0.8, 0.95, 0.7, 0.88, 0.0, 0.92, 0.91, 0.86, 0.83]
    phd = [3.0, 4.0, 5.0, 2.0, 9.0, 3.5, 60.0, 2.5, 3.2, 4.1, 4.4]
    penalised = [p == 0.0 for p in pdc]
    fences = strategy.fit(pdc, phd, penalised)
    # 10 usable cases, alpha 0.1 per fence: rank floor(0.1 * 11) = 1, the extremes
    assert (fences.n_used, fences.n_excluded_penalised) == (10, 1)
    assert (fences.pdc_low, fences.phd_high) == (0.7, 9.0)
    assert fences.is_outlier(0.0, 60.0)  # the penalised case is still judged
    assert not fences.is_outlier(0.7, 9.0) and fences.is_outlier(0.69, 5.0)
    back = strategy.fences_from_dict(json.loads(json.dumps(fences.to_dict())))
    assert back == fences
    with pytest.raises(ValueError, match="missing keys"):
        strategy.fences_from_dict({"pdc_low": 0.5, "phd_high": 3.0, "k": 1.5})
    with pytest.raises(ValueError, match=r"pDC\[1\] is nan"):
        strategy.fit([0.9, float("nan")] * 10, [1.0] * 20)
    with pytest.raises(ValueError, match="need at least 19 usable reference cases; got 10"):
        ConformalThresholds(alpha=0.1).fit(pdc, phd, penalised)
    with pytest.raises(ValueError, match="alpha must lie in"):
        ConformalThresholds(alpha=1.5)


# --------------------------------------------------------------------------- TENT refiner


def _norm_keys(model: Any) -> set[str]:
    """state_dict keys that belong to normalisation layers (affine parameters and statistics)."""
    from qcloop_tent.refiner import normalisation_layers

    layers = {id(m) for m in normalisation_layers(model)}
    return {
        f"{name}.{key}" if name else key
        for name, module in model.named_modules()
        if id(module) in layers
        for key in module.state_dict()
    }


def _changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    import torch

    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one thread (other processes share the cores); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _small_segmenter(images: np.ndarray, labels: np.ndarray) -> Any:
    """A two-layer convolutional segmenter with batch normalisation, fitted briefly."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout2d(0.3),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )
    x, y = torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _accuracy(model: Any, images: np.ndarray, labels: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        pred = model(torch.from_numpy(images[:, None])).argmax(1).numpy()
    return float((pred == labels).mean())


@needs_tent
def test_tent_lowers_entropy_on_shifted_slices_updating_only_normalisation() -> None:
    from qcloop_tent.refiner import TentRefiner

    from qcloop.monitor import FlaggedSet, SliceSet

    images, labels = heart_slices(16, size=32, seed=0)
    model = _small_segmenter(images, labels)
    shifted = images * 2.5 + 1.5  # a contrast and brightness shift
    flagged = FlaggedSet(images=[shifted[:8], shifted[8:]])
    labelled = SliceSet(images[:, None], labels)
    start = copy.deepcopy(model.state_dict())
    accuracy_before = _accuracy(model, shifted, labels)
    calls: list[int] = []

    def still_ood(m: Any) -> int:
        calls.append(1)
        return 2

    refiner = TentRefiner(epochs=6, lr=0.01, batch_size=8, seed=3)
    history = refiner.refine(model, None, flagged, labelled, still_ood)
    assert history["entropy_after"] < 0.5 * history["entropy_before"]
    losses = [e["loss"] for e in history["epochs"]]
    assert len(losses) == 6 and losses == sorted(losses, reverse=True) and len(calls) == 7
    assert _accuracy(model, shifted, labels) > accuracy_before  # adapting helps, no label used
    assert not model.training and all(p.requires_grad for p in model.parameters())
    changed = _changed(start, model.state_dict())
    assert changed <= _norm_keys(model)
    assert {"1.weight", "1.bias", "5.weight", "5.bias"} <= changed
    # seeded: the same refinement of the same model gives the same weights
    again = copy.deepcopy(model)
    again.load_state_dict(start)
    TentRefiner(epochs=6, lr=0.01, batch_size=8, seed=3).refine(
        again, None, flagged, labelled, still_ood
    )
    assert not _changed(model.state_dict(), again.state_dict())


@needs_tent
def test_tent_stops_when_no_flagged_case_is_out_of_distribution() -> None:
    from qcloop_tent.refiner import TentRefiner
    from torch import nn

    from qcloop.monitor import FlaggedSet, SliceSet

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    images, labels = heart_slices(6, size=16, seed=1)
    flagged = FlaggedSet(images=[images[:3], images[3:]])
    labelled = SliceSet(images[:, None], labels)
    start = copy.deepcopy(model.state_dict())
    none_left = TentRefiner(epochs=5).refine(model, None, flagged, labelled, lambda m: 0)
    assert none_left["stopped"] == "no OoD case" and not none_left["epochs"]
    assert not _changed(start, model.state_dict())
    counts = iter([2, 0])
    history = TentRefiner(epochs=5).refine(model, None, flagged, labelled, lambda m: next(counts))
    assert history["stopped"] == "no OoD case left" and len(history["epochs"]) == 1
    no_norm = nn.Conv2d(1, 4, 1)
    with pytest.raises(ValueError, match="no normalisation layer"):
        TentRefiner().refine(no_norm, None, flagged, labelled, lambda m: 1)


# --------------------------------------------------------------------------- exporter


@needs_tent
def test_exporter_writes_one_line_per_event_and_nothing_unasked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qcloop_tent.exporter import JsonlEventLog

    from qcloop.monitor import CaseFailed, CaseScored, ServiceInfo, WindowChanged, WindowStats

    monkeypatch.delenv(EVENTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    log = JsonlEventLog()
    batch = CaseScored({"view": "SA", "ood": False})
    log.write(batch)  # no service, no QCLOOP_TENT_EVENTS: nowhere
    quiet = ServiceInfo(kind="serve", config=None)
    log.service_started(quiet)
    log.write(CaseScored({"view": "SA"}, service=quiet.id))
    log.service_stopped(quiet)
    assert list(tmp_path.iterdir()) == []

    out = tmp_path / "out"
    service = ServiceInfo(kind="monitor", config=None, out=out)
    log.service_started(service)
    log.write(CaseScored({"view": "SA", "ood": True}, service=service.id))
    log.write(CaseFailed("read", "not NIfTI", "notes.txt", service=service.id))
    log.write(WindowChanged("SA", WindowStats(1, 1.0, 0.8), 0.9, "case", service=service.id))
    log.write(batch)  # no service named: the running service's file
    log.service_stopped(service)
    lines = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    kinds = [line["kind"] for line in lines]
    assert kinds == [
        "service_started",
        "case_scored",
        "case_failed",
        "window_changed",
        "case_scored",
        "service_stopped",
    ]
    assert {line["service"] for line in lines} == {service.id}
    assert lines[1]["record"] == {"view": "SA", "ood": True} and lines[2]["stage"] == "read"
    # the plugin writes the event's fields as they are (a window without estimates: None)
    assert lines[3]["stats"] == {"n": 1, "ood_fraction": 1.0, "median_pdc": 0.8, "median_est": None}
    assert all(line["logged_at"].endswith("+00:00") for line in lines)

    monkeypatch.setenv(EVENTS_ENV, str(tmp_path / "batch.jsonl"))
    log.write(batch)  # a batch command's event, when asked for
    (line,) = (tmp_path / "batch.jsonl").read_text().splitlines()
    assert json.loads(line)["kind"] == "case_scored" and json.loads(line)["service"] is None


# --------------------------------------------------------------------------- the loop


def _qcloop(*args: str, block: tuple[str, ...] = ()) -> str:
    """Run ``qcloop ARGS`` in process with a fresh plugin manager (``block``: plugins blocked
    through QCLOOP_BLOCK_PLUGINS); return its output."""
    from click.testing import CliRunner

    from qcloop.monitor.cli.main import cli

    reset_plugin_manager()
    env = {BLOCK_PLUGINS_ENV: ",".join(block) or None, EVENTS_ENV: None}
    try:
        result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    finally:
        reset_plugin_manager()
    assert result.exit_code == 0, result.output
    return result.output


def _tent_config() -> QcloopConfig:
    """The tests' tiny configuration with the example's strategy and refiner."""
    data = tiny_run_config().model_dump(mode="json")
    data["assessment"]["thresholds"] = {"name": "conformal", "params": {"alpha": ALPHA}}
    data["refinement"]["refiner"] = {"name": "tent", "params": {"epochs": 2, "lr": 0.001}}
    return QcloopConfig.model_validate(data)


@pytest.fixture(scope="module")
def tent_run(
    tiny_run: Path, tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The short-axis half of ``tiny_run``, calibrated again by ``qcloop train --view SA`` with
    the conformal strategy and the built-in strategies blocked. The segmenters' training is
    complete, so train resumes past it: it fits the QC module and calibrates the fences."""
    if not _installed():
        pytest.skip(f"the example plugin qcloop-tent is not installed ({INSTALL})")
    root = tmp_path_factory.mktemp("tent")
    run = root / "run"
    # the segmenters and their training state; the fences (iqr's) are calibrated anew
    shutil.copytree(tiny_run / "SA", run / "SA", ignore=shutil.ignore_patterns("fences.json"))
    save_config(_tent_config(), root / "tent.yaml")
    args = ["--data", str(tiny_cohort), "--out", str(run), "--view", "SA"]
    _qcloop("train", *args, "--config", str(root / "tent.yaml"), block=BUILTINS)
    yield run
    reset_plugin_manager()


@needs_tent
def test_the_plugin_is_loaded_from_its_entry_point(plugin_env: pytest.MonkeyPatch) -> None:
    summaries = json.loads(_qcloop("plugins", "--json"))
    (tent,) = [s for s in summaries if s["name"] == "tent"]
    assert (tent["builtin"], tent["distribution"]) == (False, "qcloop-tent")
    assert tent["components"] == {"refiners": ["tent"], "threshold_strategies": ["conformal"]}
    assert set(EVENT_HOOKS) <= set(tent["hooks"])  # every event hook, service start/stop too


@pytest.fixture(scope="module")
def monitored(tent_run: Path, tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of ``qcloop monitor --once`` with ``tent_run`` on four short-axis cases (two of
    the training vendor, two of a shifted one), the Prometheus exporter and the built-ins
    blocked by the configuration. Its ``processed/SA`` is a small dataset folder."""
    from qcloop.monitor.data import discover

    root = tmp_path_factory.mktemp("monitor")
    inbox, out = root / "inbox", root / "out"
    inbox.mkdir()
    sources = discover(tiny_cohort, views=["SA"])
    for vendor in ("A", "C"):
        for src in [s for s in sources if s.vendor == vendor][:2]:
            shutil.copy2(src.image_path, inbox / src.image_path.name)
    settings = {
        "monitoring": {"refine_on_alert": False, "http_port": free_port()},
        "plugins": {"block": [PROMETHEUS, *BUILTINS]},
    }
    (root / "monitor.yaml").write_text(yaml.safe_dump(settings))
    args = ["--run", str(tent_run), "--inbox", str(inbox), "--out", str(out)]
    args += ["--config", str(root / "monitor.yaml"), "--once", "--settle-s", "0"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the model registry's files stay in the test's folder
        _qcloop("monitor", *args, "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}")
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_tent
def test_monitor_exports_events_as_json_lines_with_prometheus_blocked(
    monitored: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    records, events = _jsonl(monitored / "records.jsonl"), _jsonl(monitored / "events.jsonl")
    assert len(records) == 4
    started, stopped = events[0], events[-1]
    assert (started["kind"], stopped["kind"]) == ("service_started", "service_stopped")
    assert started["service"] == stopped["service"] and started["service_kind"] == "monitor"
    assert started["endpoints"] == {}  # no Prometheus exporter opened /metrics
    assert [e["record"] for e in events if e["kind"] == "case_scored"] == records
    assert {e["service"] for e in events} == {started["service"]}
    windows = [e for e in events if e["kind"] == "window_changed" and e["cause"] == "case"]
    assert [w["stats"]["n"] for w in windows] == [1, 2, 3, 4]
    assert all(r["fences"]["alpha"] == ALPHA for r in records)  # judged by conformal fences


@needs_tent
def test_train_and_assess_use_the_conformal_fences(
    tent_run: Path, monitored: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    from qcloop_tent.conformal import ConformalFences

    saved = json.loads((tent_run / "SA" / "fences.json").read_text())
    assert saved["strategy"] == {"name": "conformal", "params": {"alpha": ALPHA}}
    assert ConformalFences.from_dict(saved["phases"]["all"]).alpha == ALPHA
    data, out = monitored / "processed" / "SA", tmp_path / "assess"
    _qcloop("assess", "--data", str(data), "--run", str(tent_run), "--out", str(out))
    records = _jsonl(out / "records.jsonl")
    assert len(records) == 4 and {r["view"] for r in records} == {"SA"}
    for r in records:
        assert r["fences"] == saved["phases"].get(r["phase"], saved["phases"]["all"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["views"]["SA"]["ood"] == sum(r["ood"] for r in records) > 0


@pytest.fixture(scope="module")
def refined_run(tent_run: Path, monitored: Path) -> Path:
    """``qcloop refine`` of ``tent_run`` on the monitored cases, built-in refiners blocked."""
    out = tent_run.parent / "refined"
    args = ["--data", str(monitored / "processed" / "SA"), "--run", str(tent_run)]
    _qcloop("refine", *args, "--out", str(out), block=BUILTINS)
    return out


@needs_tent
def test_refine_runs_tent_and_changes_only_normalisation(
    tent_run: Path, refined_run: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    from qcloop.monitor.method.run_folder import load_model_set

    info = json.loads((refined_run / "run.json").read_text())["views"]["SA"]
    assert info["refiner"] == "tent" and info["flagged"] > 0
    for h in info["history"]:  # one per candidate: it adapted, starting from OoD cases
        assert h["refiner"] == "tent" and h["ood_before"] > 0 and h["epochs"]
        assert np.isfinite([h["entropy_before"], h["entropy_after"]]).all()
    parent = load_model_set(tent_run, "SA")
    refined = load_model_set(refined_run, "SA")
    for before, after in zip(parent.candidates, refined.candidates, strict=True):
        changed = _changed(before.state_dict(), after.state_dict())
        assert changed and changed <= _norm_keys(before)
        assert any(k.endswith((".weight", ".bias")) for k in changed)
