"""Contract tests: every registered component of every kind keeps what its interface promises.

Parametrised at collection time over the plugin registries (built-ins and any third-party plugin
installed in the environment), so a new plugin is tested by installing it: segmenters, QC
modules, threshold strategies, refiners, runtimes, and exporters (every plugin implementing
``on_service_started``). A component that cannot run here (a missing optional dependency, or
too slow for CPU) is skipped with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qcloop.monitor.core import events as events_module
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.events import Event, ServiceInfo, WindowStats
from qcloop.monitor.core.optional import MissingExtraError
from qcloop.monitor.core.plugin_manager import QcloopPluginManager, make_plugin_manager
from qcloop.monitor.core.slices import FlaggedSet, SliceSet
from qcloop.monitor.method.qc_call import call_reconstruct, needs_image
from qcloop.monitor.method.segmentation_metrics import fov_diagonal_mm
from tests.helpers import heart_slices, tiny_run_config

#: The registries as installed, read once when the module is collected.
PM = make_plugin_manager()
KINDS = ("segmenters", "qc_modules", "threshold_strategies", "refiners", "runtimes")
NAMES = {kind: PM.registry(kind).names() for kind in KINDS}
EXPORTERS = sorted({impl.plugin_name for impl in PM.hook.on_service_started.get_hookimpls()})

#: Small sizes for the built-ins (as tests/helpers.py trains them); other components get their
#: defaults (plus a seed where they take one).
SMALL_PARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "segmenters": {
        "bn1": {"base_width": 8, "max_width": 32, "depth": 4},
        "bn2": {"base_width": 8, "depth": 4},
    },
    "qc_modules": {
        # two epochs: collapse checks off, as tests/test_autoencoder.py does for short runs
        "autoencoder": {
            "input_size": 32,
            "width_scale": 0.25,
            "latent_channels": 8,
            "epochs": 2,
            "batch_size": 4,
            "collapse_dice": 0.0,
            "collapse_fraction": 0.0,
        },
        "image_autoencoder": {
            "input_size": 32,
            "width_scale": 0.25,
            "latent_channels": 8,
            "epochs": 2,
            "batch_size": 4,
            "collapse_dice": 0.0,
        },
    },
    "refiners": {
        "alpha": {"k_semi": 2, "batch_size": 4, "max_slices_per_epoch": 4},
        "blend": {"epochs": 2, "batch_size": 4, "max_slices_per_epoch": 8},
    },
}
#: A component slower than this on CPU is skipped (it cannot be contract-tested here).
SLOW_S = 20.0
SIZE = 32


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise ``segmenter``, ``qc_module``, ``strategy``, ``refiner``, ``runtime`` and
    ``exporter`` over the registered names."""
    for arg, names in (
        ("segmenter", NAMES["segmenters"]),
        ("qc_module", NAMES["qc_modules"]),
        ("strategy", NAMES["threshold_strategies"]),
        ("refiner", NAMES["refiners"]),
        ("runtime", NAMES["runtimes"]),
        ("exporter", EXPORTERS),
    ):
        if arg in metafunc.fixturenames:
            metafunc.parametrize(arg, names)


def _create(kind: str, name: str, **extra: Any) -> Any:
    """The component ``name`` of ``kind``, small for a built-in; skipped when it cannot be built."""
    params = {**SMALL_PARAMS.get(kind, {}).get(name, {}), **extra}
    try:
        return PM.registry(kind).create(name, params)
    except (ImportError, MissingExtraError) as exc:
        pytest.skip(f"{kind} {name!r} cannot be built here: {exc}")


def _seeded(kind: str, name: str, seed: int, **extra: Any) -> Any:
    torch.manual_seed(seed)
    return _create(kind, name, **extra)


def _timed(kind: str, name: str, fn: Callable[[], Any]) -> Any:
    """``fn()``; for a third-party component, the test is skipped when that took longer than
    :data:`SLOW_S` on this CPU (the built-ins are sized to run fast and never skipped)."""
    start = time.perf_counter()
    result = fn()
    builtin = PM.is_builtin(PM.registry(kind).plugin_of(name))
    if time.perf_counter() - start > SLOW_S and not builtin:
        pytest.skip(f"{name!r} takes over {SLOW_S:.0f} s on CPU; not contract-tested here")
    return result


def _assert_equal_states(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _probabilities(labels: np.ndarray, classes: int = 4, seed: int = 0) -> np.ndarray:
    """Softmax-like maps ``(N, C, H, W)`` peaked at ``labels``, with seeded noise."""
    rng = np.random.default_rng(seed)
    logits = 4.0 * np.eye(classes, dtype=np.float32)[labels].transpose(0, 3, 1, 2)
    logits += rng.normal(0, 1, logits.shape).astype(np.float32)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def _assert_probabilities(p: np.ndarray, shape: tuple[int, ...]) -> None:
    assert p.shape == shape
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-4)


# --------------------------------------------------------------------------- segmenters


def _grid(model: torch.nn.Module) -> tuple[int, int]:
    """A small non-square ``(H, W)``, both multiples of the model's ``divisor``."""
    d = int(model.divisor)
    side = d * max(1, math.ceil(SIZE / d))
    return side, side + 2 * d


def test_segmenter_contract(segmenter: str) -> None:
    model = _seeded("segmenters", segmenter, 0)
    initial = copy.deepcopy(model.state_dict())
    h, w = _grid(model)
    c_in, classes = int(model.in_channels), int(model.num_classes)
    x = torch.randn(2, c_in, h, w, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        out = _timed("segmenters", segmenter, lambda: model(x))
        zeros = model(torch.zeros_like(x))
    assert isinstance(out, torch.Tensor), "eval mode returns one tensor"
    assert out.shape == (2, classes, h, w) and zeros.shape == out.shape
    assert torch.isfinite(out).all() and torch.isfinite(zeros).all()

    weights = list(model.deep_supervision_weights())
    assert math.isclose(sum(weights), 1.0, abs_tol=1e-6)
    model.train()
    train_out = model(x)
    outputs = train_out if isinstance(train_out, list | tuple) else [train_out]
    assert len(outputs) in (1, len(weights))
    assert outputs[0].shape == (2, classes, h, w)
    assert all(torch.isfinite(o).all() for o in outputs)
    assert isinstance(model.describe(), dict)
    optimiser, _scheduler = model.make_optimizer(2)
    assert isinstance(optimiser, torch.optim.Optimizer)

    # the same seed builds the same network; a state dict carries it completely
    _assert_equal_states(initial, _seeded("segmenters", segmenter, 0).state_dict())
    other = _seeded("segmenters", segmenter, 123)
    other.load_state_dict(copy.deepcopy(model.state_dict()))
    model.eval()
    other.eval()
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


# --------------------------------------------------------------------------- QC modules


@pytest.fixture(scope="module")
def qc_masks() -> dict[str, np.ndarray]:
    """Training and validation masks, with the slices an image-aware module reads beside them."""
    images, train = heart_slices(16, SIZE, seed=3)
    val_images, val = heart_slices(4, SIZE, seed=4)
    return {"train": train, "val": val, "images": images, "val_images": val_images}


def _fitted_qc(name: str, data: dict[str, np.ndarray]) -> Any:
    qc = _create("qc_modules", name)
    if int(qc.input_size) != SIZE:
        pytest.skip(f"QC module {name!r} works on {qc.input_size} px masks by default")
    images = {k: data[k] for k in ("images", "val_images")} if needs_image(qc) else {}
    history = _timed(
        "qc_modules", name, lambda: qc.fit(data["train"], data["val"], seed=0, **images)
    )
    assert isinstance(history, dict)
    return qc


def test_qc_module_contract(qc_module: str, qc_masks: dict[str, np.ndarray]) -> None:
    qc = _fitted_qc(qc_module, qc_masks)
    classes = int(qc.num_classes)
    shape = (3, classes, SIZE, SIZE)
    probs = _probabilities(qc_masks["val"][:3], classes)
    image = qc_masks["val_images"][:3]  # reaches only a module that reads it
    recon = call_reconstruct(qc, probs, image)
    _assert_probabilities(recon, shape)
    background = np.zeros(shape, np.float32)
    background[:, 0] = 1.0
    _assert_probabilities(call_reconstruct(qc, background, image), shape)

    # fitting again with the same seed gives the same module; its state dict carries it
    again = _fitted_qc(qc_module, qc_masks)
    np.testing.assert_array_equal(call_reconstruct(again, probs, image), recon)
    restored = _create("qc_modules", qc_module)
    restored.load_state_dict(qc.state_dict())
    np.testing.assert_array_equal(call_reconstruct(restored, probs, image), recon)


# --------------------------------------------------------------------------- threshold strategies


@pytest.fixture(scope="module")
def scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.uniform(0.6, 0.95, 40), rng.uniform(2.0, 15.0, 40)


PDC_GRID = np.linspace(0.0, 1.0, 41)
PHD_GRID = np.linspace(0.0, 120.0, 41)


def _judgements(fences: Any) -> np.ndarray:
    """``is_outlier`` on a grid: rows by rising pDC, columns by rising pHD."""
    return np.array([[fences.is_outlier(float(p), float(h)) for h in PHD_GRID] for p in PDC_GRID])


def test_threshold_strategy_contract(strategy: str, scores: tuple[np.ndarray, np.ndarray]) -> None:
    pdc, phd = scores
    s = _create("threshold_strategies", strategy)
    fences = s.fit(pdc, phd)
    assert math.isfinite(fences.pdc_low) and math.isfinite(fences.phd_high)
    judged = _judgements(fences)
    # worse (lower) pDC or worse (higher) pHD never turns an outlier into an inlier
    assert (np.diff(judged.astype(int), axis=0) <= 0).all(), "outlier at higher pDC only"
    assert (np.diff(judged.astype(int), axis=1) >= 0).all(), "outlier at lower pHD only"
    assert judged.any() and not judged.all()

    data = json.loads(json.dumps(fences.to_dict(), allow_nan=False))
    np.testing.assert_array_equal(_judgements(s.fences_from_dict(data)), judged)

    # an empty prediction's penalty (pDC 0, pHD the field-of-view diagonal) is always an outlier
    diagonal = fov_diagonal_mm((128, 128, 10), (1.8, 1.8, 10.0))
    penalised = np.zeros(len(pdc) + 2, dtype=bool)
    penalised[-2:] = True
    fitted = s.fit(np.r_[pdc, 0.0, 0.0], np.r_[phd, diagonal, diagonal], penalised)
    assert fitted.is_outlier(0.0, diagonal)
    assert fences.is_outlier(0.0, diagonal)


@pytest.mark.parametrize("bad", ["pdc_nan", "pdc_inf", "phd_nan", "phd_inf"])
def test_threshold_strategy_refuses_non_finite_scores(
    strategy: str, scores: tuple[np.ndarray, np.ndarray], bad: str
) -> None:
    pdc, phd = (a.copy() for a in scores)
    target = pdc if bad.startswith("pdc") else phd
    target[3] = np.nan if bad.endswith("nan") else np.inf
    with pytest.raises(ValueError):
        _create("threshold_strategies", strategy).fit(pdc, phd)


# --------------------------------------------------------------------------- refiners


class _TemplateQC:
    """A stand-in QC module: every reconstruction is (mostly) a fixed plausible heart."""

    def __init__(self, labels: np.ndarray) -> None:
        self.template = np.eye(4, dtype=np.float32)[labels].transpose(0, 3, 1, 2)

    def reconstruct(self, probabilities: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        # a refiner that uses the QC module passes the case's slices (an image-aware module
        # reads them); a refiner that never calls it (TENT) is not bound by this
        assert image is not None and image.shape == probabilities[:, 0].shape
        n = len(probabilities)
        return (0.9 * self.template[:n] + 0.1 * probabilities).astype(np.float32)


@pytest.fixture(scope="module")
def refine_inputs() -> tuple[torch.nn.Module, _TemplateQC, FlaggedSet, SliceSet]:
    torch.manual_seed(0)
    model = PM.segmenters().create("bn2", SMALL_PARAMS["segmenters"]["bn2"])
    model.eval()
    images, labels = heart_slices(16, SIZE, seed=5)
    flagged_images, flagged_labels = heart_slices(6, SIZE, seed=6)
    flagged = FlaggedSet(
        images=[flagged_images[:3], flagged_images[3:]],
        selected=[_probabilities(flagged_labels[:3]), _probabilities(flagged_labels[3:], seed=1)],
    )
    return model, _TemplateQC(flagged_labels), flagged, SliceSet(images[:, None], labels)


def _refined(name: str, inputs: tuple, flagged: FlaggedSet | None = None) -> tuple[Any, Any]:
    """A copy of the tiny segmenter refined by ``name`` (seed 3); its history."""
    base, qc, default_flagged, labeled = inputs
    flagged = default_flagged if flagged is None else flagged
    model = copy.deepcopy(base)
    refiner = _create("refiners", name, seed=3)
    logged: list[tuple[dict[str, float], int]] = []
    history = _timed(
        "refiners",
        name,
        lambda: refiner.refine(
            model,
            qc,
            flagged,
            labeled,
            lambda m: len(flagged),  # no flagged case is ever resolved
            log_metrics=lambda metrics, step: logged.append((metrics, step)),
        ),
    )
    assert all(isinstance(v, float | int) for metrics, _ in logged for v in metrics.values())
    return model, history


def test_refiner_contract(refiner: str, refine_inputs: tuple) -> None:
    model, history = _refined(refiner, refine_inputs)
    assert isinstance(history, dict)
    json.dumps(history, allow_nan=False)
    assert not model.training, "a refiner leaves the model in eval mode"
    assert all(
        torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()
    )
    again, again_history = _refined(refiner, refine_inputs)
    _assert_equal_states(model.state_dict(), again.state_dict())
    assert json.dumps(history) == json.dumps(again_history)


def test_refiner_without_flagged_cases_changes_nothing(refiner: str, refine_inputs: tuple) -> None:
    model, history = _refined(refiner, refine_inputs, FlaggedSet(images=[], selected=[]))
    assert isinstance(history, dict)
    _assert_equal_states(model.state_dict(), refine_inputs[0].state_dict())


# --------------------------------------------------------------------------- runtimes


@pytest.fixture(scope="module")
def runtime_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``tiny_run`` with the SA models exported where runtimes look by default (the
    ``onnxruntime`` runtime reads ``RUN/onnx``), when ``qcloop export-onnx`` is installed; a
    missing optional extra leaves no export (such a runtime is then skipped)."""
    import click
    from click.testing import CliRunner

    from qcloop.monitor.cli.main import cli

    run = tmp_path_factory.mktemp("contracts") / "run"
    shutil.copytree(tiny_run, run)
    if "export-onnx" in cli.list_commands(click.Context(cli)):
        args = ["export-onnx", "--run", str(run), "--view", "SA", "--cases", "1"]
        result = CliRunner().invoke(cli, args)
        if result.exit_code != 0 and "pip install 'qcloop[" not in result.output:
            raise AssertionError(f"qcloop export-onnx failed:\n{result.output}")
    return run


def _runtime(name: str, run: Path) -> Any:
    factory = PM.runtimes()[name].factory
    cfg = tiny_run_config()
    try:
        return factory(run, "SA", cfg, threads=1)
    except (ImportError, MissingExtraError) as exc:
        pytest.skip(f"runtime {name!r} cannot run here: {exc}")


def test_runtime_contract(runtime: str, runtime_run: Path) -> None:
    rt = _runtime(runtime, runtime_run)
    size, n = int(rt.input_size), int(rt.n_candidates)
    assert size % int(rt.divisor) == 0 and n >= 1
    providers = rt.providers()
    assert isinstance(providers, list) and providers and all(isinstance(p, str) for p in providers)
    image = np.random.default_rng(2).standard_normal((3, size, size)).astype(np.float32)
    maps = rt.segment(image)
    assert len(maps) == n
    for m in maps:
        _assert_probabilities(m, (3, m.shape[1], size, size))
    recon = rt.reconstruct(maps[0])
    _assert_probabilities(recon, maps[0].shape)

    empty = rt.segment(np.zeros((0, size, size), np.float32))
    assert len(empty) == n and all(m.shape == (0, *maps[0].shape[1:]) for m in empty)
    assert rt.reconstruct(empty[0]).shape == empty[0].shape

    if runtime != "torch" and "torch" in NAMES["runtimes"]:
        reference = _runtime("torch", runtime_run)
        for got, want in zip(maps, reference.segment(image), strict=True):
            assert np.abs(got - want).max() <= 1e-4
        assert np.abs(recon - reference.reconstruct(maps[0])).max() <= 1e-4


# --------------------------------------------------------------------------- exporters


def _sample_events(service: str) -> list[Event]:
    """One valid event of every kind, from ``service``."""
    window = WindowStats(n=12, ood_fraction=0.25, median_pdc=0.81)
    record = {
        "subject": "001",
        "view": "SA",
        "phase": "ED",
        "ood": True,
        "model": {"name": "qcloop-SA", "version": "3"},
        "runtime": {"name": "torch", "providers": ["torch:cpu"]},
        "latency_s": 0.05,
    }
    model = {"name": "qcloop-SA", "version": "3"}
    return [
        events_module.CaseScored(record, service=service),
        events_module.CaseFailed("read", "not a NIfTI file", "x.nii.gz", "SA", service=service),
        events_module.WindowChanged("SA", window, 0.86, "case", "3", service=service),
        events_module.DriftAlert(
            "SA",
            "qcloop",
            ("OoD fraction 0.25 > 0.2",),
            window,
            0.86,
            model,
            "2025-01-01T00:00:00Z",
            {"ood_fraction": 0.2},
            service=service,
        ),
        events_module.ModelRefined("SA", "/tmp/run", {"cases": 12, "ood": 3}, service=service),
        events_module.FeedbackReceived(
            "SA",
            "c-1",
            {"RV": {"dice": 0.7, "hd_mm": 9.0, "pdc": 0.8}},
            True,
            True,
            service=service,
        ),
        events_module.ModelVersionRegistered("qcloop-SA", "4", {"parent": "3"}, service=service),
        events_module.ModelVersionPromoted("qcloop-SA", "4", "champion", "3", service=service),
        events_module.ModelsLoaded(
            {"SA": {"name": "qcloop-SA", "version": "3", "runtime": "torch"}}, service=service
        ),
        events_module.AdmissionChanged(running=1, waiting=2, rejected=True, service=service),
    ]


def test_sample_events_cover_every_event_kind() -> None:
    kinds = {
        cls
        for _, cls in inspect.getmembers(events_module, inspect.isclass)
        if issubclass(cls, Event) and cls is not Event and dataclasses.is_dataclass(cls)
    }
    sampled = {type(e) for e in _sample_events("x")}
    assert sampled == kinds, f"add a sample of {kinds - sampled}"
    hooks = {name for name in dir(PM.hook) if name.startswith("on_")}
    assert {f"on_{cls.kind}" for cls in kinds} <= hooks


def test_exporter_contract(exporter: str, tmp_path: Path) -> None:
    pm = QcloopPluginManager()
    pm.register(PM.get_plugin(exporter), name=exporter)
    cfg = QcloopConfig.model_validate({"monitoring": {"http_port": 0}})
    service = ServiceInfo(kind="monitor", config=cfg, out=tmp_path)
    assert pm.call_each("on_service_started", service=service) == 0
    try:
        for event in _sample_events(service.id):
            assert pm.emit(event) == 0, f"{exporter} failed on {event.kind}"
    finally:
        assert pm.call_each("on_service_stopped", service=service) == 0
