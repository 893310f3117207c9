"""Models qcloop did not train, run from model cards: one MONAI U-Net saved as torch weights,
TorchScript and ONNX gives the same probabilities; the label map, the activations, and errors
naming the card, the field or the case. Also the preprocessing they need: the forward map of
probability maps and the ``minmax`` / ``none`` / custom-percentile normalisations."""

from __future__ import annotations

import sys
import textwrap
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage

from qcloop.monitor.core.interfaces import ExternalModel
from qcloop.monitor.core.model_card import ModelCardError, load_card
from qcloop.monitor.core.optional import MissingExtraError
from qcloop.monitor.core.plugin_manager import make_plugin_manager
from qcloop.monitor.data import Case, CaseError, CaseSource, Preprocessor
from qcloop.monitor.method.external import CardPredictor, load_card_model

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # TorchScript is deprecated in torch 2.13, and still what many authors ship
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning"),
]

UNET_PARAMS: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 4,
    "channels": [8, 16],
    "strides": [2],
}
#: The U-Net's own label order: RV and LV swapped against qcloop's (0 bg, 1 LV, 2 MYO, 3 RV).
MODEL_LABELS = "{0: background, 1: RV, 2: MYO, 3: LV}"
INPUT = "{spacing_mm: 1.5, size: 64, divisor: 4, normalise: percentile, percentiles: [1, 99]}"
Z_SPACING = 8.0

#: Small modules the ``torch`` kind imports by name (written to a module on sys.path).
NETS_SOURCE = """
import torch


class Constant(torch.nn.Module):
    '''Logits with all the mass in class ``hot`` (or probabilities / labels / NaN).'''

    def __init__(self, classes=4, hot=1, mode="logits"):
        super().__init__()
        self.classes, self.hot, self.mode = classes, hot, mode
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        n, _, h, w = x.shape
        out = torch.zeros(n, self.classes, h, w)
        out[:, self.hot] = 20.0 * self.scale
        if self.mode == "probabilities":
            return torch.softmax(out, dim=1)
        if self.mode == "labels":
            return torch.full((n, h, w), float(self.hot))
        if self.mode == "nan":
            return out * float("nan")
        return out
"""


def make_case(
    folder: Path,
    shape: tuple[int, int, int] = (72, 80, 3),
    spacing: float = 1.37,
    view: str = "SA",
) -> Case:
    """A tiny phantom: a bright blood pool in a dark ring on a grey ground, with noise."""
    x, y, z = shape
    gx = (np.arange(x) - (x - 1) / 2) * spacing
    gy = (np.arange(y) - (y - 1) / 2) * spacing
    radius = np.hypot(*np.meshgrid(gx - 4.0, gy + 3.0, indexing="ij"))
    image = np.where(radius < 18.0, 900.0, np.where(radius < 26.0, 250.0, 450.0))
    image = np.repeat(image[:, :, None], z, axis=2)
    image += np.random.default_rng(3).normal(0.0, 30.0, shape)
    source = CaseSource("001", view, "ED", folder / f"001_{view}_ED.nii.gz", None)
    affine = np.diag([spacing, spacing, Z_SPACING, 1.0])
    return Case(source, image.astype(np.float32), None, (spacing, spacing, Z_SPACING), affine, None)


def write_card(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture(scope="module")
def unet_cards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One seeded MONAI U-Net saved as weights, TorchScript and ONNX, with a card for each."""
    from monai.networks.nets import UNet

    folder = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    net = UNet(**UNET_PARAMS).eval()
    example = torch.randn(2, 1, 64, 64)
    torch.save(net.state_dict(), folder / "unet.pt")
    axes = {0: "n", 2: "h", 3: "w"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter chatter
        torch.jit.trace(net, example).save(str(folder / "unet.ts"))
        for name, dynamic in (("unet.onnx", {"image": axes, "logits": axes}), ("fixed.onnx", {})):
            torch.onnx.export(
                net,
                (example,),
                str(folder / name),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes=dynamic,
                opset_version=17,
                dynamo=False,
            )
    common = (
        f"views: [SA]\ninput: {INPUT}\noutput: {{activation: softmax, labels: {MODEL_LABELS}}}\n"
    )
    params = "{spatial_dims: 2, in_channels: 1, out_channels: 4, channels: [8, 16], strides: [2]}"
    return {
        "torch": write_card(
            folder,
            "torch.yaml",
            f"kind: torch\npath: unet.pt\nmodule: monai.networks.nets.UNet\n"
            f"params: {params}\n{common}",
        ),
        "torchscript": write_card(folder, "ts.yaml", f"kind: torchscript\npath: unet.ts\n{common}"),
        "onnx": write_card(folder, "onnx.yaml", f"kind: onnx\npath: unet.onnx\n{common}"),
        "fixed": write_card(
            folder,
            "fixed.yaml",
            f"kind: onnx\npath: fixed.onnx\nviews: [SA]\ninput: {{size: 96, divisor: 4}}\n"
            f"output: {{labels: {MODEL_LABELS}}}\n",
        ),
        "net": folder,  # type: ignore[dict-item]
    }


@pytest.fixture
def nets_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The import name of a module holding :data:`NETS_SOURCE`."""
    name = f"qcloop_card_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(NETS_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def constant_card(
    folder: Path,
    module: str,
    *,
    hot: int = 1,
    mode: str = "logits",
    labels: str = MODEL_LABELS,
    activation: str = "softmax",
    classes: int = 4,
) -> Path:
    """A ``torch`` card of ``module.Constant`` with its (trivial) weights saved beside it."""
    sys.modules.pop(module, None)
    nets = __import__(module)
    torch.save(nets.Constant(classes, hot, mode).state_dict(), folder / "constant.pt")
    return write_card(
        folder,
        "constant.yaml",
        f"""\
        kind: torch
        path: constant.pt
        module: {module}.Constant
        params: {{classes: {classes}, hot: {hot}, mode: {mode}}}
        views: [SA]
        input: {{size: 64, divisor: 4, normalise: minmax}}
        output: {{activation: {activation}, labels: {labels}}}
        """,
    )


# --------------------------------------------------------------------------- the three kinds


def test_three_kinds_give_the_same_probabilities(unet_cards: dict[str, Path]) -> None:
    case = make_case(unet_cards["net"])
    results = {}
    for kind in ("torch", "torchscript", "onnx"):
        predictor = load_card_model(unet_cards[kind])
        assert isinstance(predictor.model, ExternalModel) and predictor.model.kind == kind
        assert predictor.views == ("SA",)
        probs = predictor.original_probabilities(case)
        assert probs.shape == (*case.shape, 4) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=3), 1.0, atol=1e-5)
        results[kind] = probs
    np.testing.assert_allclose(results["torchscript"], results["torch"], atol=1e-4)
    np.testing.assert_allclose(results["onnx"], results["torch"], atol=1e-4)


def test_torch_kind_matches_the_pipeline_by_hand(unet_cards: dict[str, Path]) -> None:
    """Percentile normalisation, spacing, crop, softmax, RV/LV swapped, restored."""
    from monai.networks.nets import UNet

    case = make_case(unet_cards["net"])
    net = UNet(**UNET_PARAMS).eval()
    net.load_state_dict(torch.load(unet_cards["net"] / "unet.pt", weights_only=True))
    prepared = Preprocessor(
        64, target_spacing=1.5, divisor=4, normalisation="percentile", percentiles=(1, 99)
    ).prepare(case)
    with torch.no_grad():
        model_order = torch.softmax(net(torch.from_numpy(prepared.image[:, None])), 1).numpy()
    qcloop_order = model_order[:, [0, 3, 2, 1]]  # qcloop label q takes model class [0,3,2,1][q]
    expected = prepared.transform.restore_probabilities(qcloop_order)
    got = load_card_model(unet_cards["torch"]).original_probabilities(case)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_kinds_say_what_they_are(unet_cards: dict[str, Path]) -> None:
    torch_model = load_card_model(unet_cards["torch"])
    assert torch_model.trainable and isinstance(torch_model.model.module, torch.nn.Module)
    assert not torch_model.model.module.training
    assert torch_model.model.providers() == ["cpu"]
    script = load_card_model(unet_cards["torchscript"])
    assert not script.trainable and script.model.module is None
    onnx = load_card_model(load_card(unet_cards["onnx"]))
    assert not onnx.trainable and onnx.model.module is None
    assert "CPUExecutionProvider" in onnx.model.providers()


def test_net_probabilities_land_on_qcloops_grid(unet_cards: dict[str, Path]) -> None:
    case = make_case(unet_cards["net"])
    predictor = load_card_model(unet_cards["onnx"])
    transform = Preprocessor(96, divisor=16).transform_for(case.shape, case.spacing)
    net = predictor.net_probabilities(case, transform)
    assert net.shape == (3, 4, 96, 96) and net.dtype == np.float32
    np.testing.assert_allclose(net.sum(axis=1), 1.0, atol=1e-5)
    original = predictor.original_probabilities(case)
    np.testing.assert_array_equal(net, transform.apply_probabilities(original))
    assert np.all(net[:, 0, :5, :] == 1.0)  # padding beyond the 72 x 80 image is background


def test_check_passes_on_good_cards(unet_cards: dict[str, Path]) -> None:
    for kind in ("torch", "torchscript", "onnx"):
        predictor = load_card_model(unet_cards[kind])
        predictor.check()
        predictor.check(make_case(unet_cards["net"]))


# --------------------------------------------------------------------------- labels, activations


@pytest.mark.parametrize(("hot", "label"), [(1, 3), (2, 2), (3, 1), (0, 0), (4, 0)])
def test_label_permutation(tmp_path: Path, nets_module: str, hot: int, label: int) -> None:
    """All mass in model class ``hot`` (1 RV, 2 MYO, 3 LV, 4 an ignored extra) lands on qcloop
    label ``label`` (3 RV, 2 MYO, 1 LV, background)."""
    labels = "{0: background, 1: RV, 2: MYO, 3: LV, 4: ignore}"
    card = constant_card(tmp_path, nets_module, hot=hot, labels=labels, classes=5)
    probs = load_card_model(card).original_probabilities(make_case(tmp_path))
    centre = probs[8:-8, 8:-8]
    assert np.all(np.argmax(centre, axis=3) == label)
    assert centre[..., label].min() > 0.99


def test_probabilities_as_they_are(tmp_path: Path, nets_module: str) -> None:
    card = constant_card(tmp_path, nets_module, hot=3, mode="probabilities", activation="none")
    probs = load_card_model(card).original_probabilities(make_case(tmp_path))
    assert np.all(np.argmax(probs[8:-8, 8:-8], axis=3) == 1)  # model class 3 is LV


def test_label_maps_become_one_hot(tmp_path: Path, nets_module: str) -> None:
    card = constant_card(tmp_path, nets_module, hot=1, mode="labels", activation="labels")
    probs = load_card_model(card).original_probabilities(make_case(tmp_path))
    np.testing.assert_array_equal(probs[8:-8, 8:-8, :, 3], 1.0)  # model class 1 is RV


def test_logits_declared_as_probabilities_are_refused(tmp_path: Path, nets_module: str) -> None:
    card = constant_card(tmp_path, nets_module, activation="none")
    case = make_case(tmp_path)
    predictor = load_card_model(card)
    with pytest.raises(CaseError, match=r"output\.activation: 'none' says") as info:
        predictor.original_probabilities(case)
    assert info.value.path == case.source.image_path and str(card) in str(info.value)
    with pytest.raises(ModelCardError) as dry:
        predictor.check()
    assert dry.value.field == "output.activation"


# --------------------------------------------------------------------------- errors


def test_nan_output_names_the_case_and_the_card(tmp_path: Path, nets_module: str) -> None:
    card = constant_card(tmp_path, nets_module, mode="nan")
    case = make_case(tmp_path)
    predictor = load_card_model(card)
    with pytest.raises(CaseError) as info:
        predictor.original_probabilities(case)
    message = str(info.value)
    assert message.startswith(str(case.source.image_path)) and str(card) in message
    assert "NaN" in message and info.value.key == case.key
    with pytest.raises(ModelCardError, match="dry run: the model returned NaN"):
        predictor.check()


def test_wrong_number_of_classes(tmp_path: Path, nets_module: str) -> None:
    card = constant_card(tmp_path, nets_module, classes=3, hot=1)  # the card lists 4 labels
    with pytest.raises(ModelCardError) as info:
        load_card_model(card).check()
    assert info.value.field == "output.labels"
    assert "the model returns 3 classes; output.labels lists 4" in str(info.value)


def test_wrong_input_size_the_model_rejects(unet_cards: dict[str, Path]) -> None:
    predictor = load_card_model(unet_cards["fixed"])  # exported for 64 x 64 only; card says 96
    with pytest.raises(ModelCardError) as info:
        predictor.check()
    assert info.value.field == "input.size" and "(2, 1, 96, 96)" in str(info.value)
    case = make_case(unet_cards["net"])
    with pytest.raises(CaseError, match="the onnx model failed on slices of 96x96"):
        predictor.original_probabilities(case)


def test_a_view_the_card_does_not_segment(unet_cards: dict[str, Path]) -> None:
    case = make_case(unet_cards["net"], view="LA")
    with pytest.raises(CaseError, match="segments SA, not LA"):
        load_card_model(unet_cards["onnx"]).original_probabilities(case)


def test_unknown_kind_lists_the_registered_ones(tmp_path: Path) -> None:
    (tmp_path / "m.bin").write_bytes(b"")
    card = write_card(
        tmp_path,
        "c.yaml",
        f"kind: tflite\npath: m.bin\nviews: [SA]\noutput: {{labels: {MODEL_LABELS}}}\n",
    )
    with pytest.raises(ModelCardError) as info:
        load_card_model(card)
    assert info.value.field == "kind"
    assert "unknown model kind 'tflite' (registered: " in str(info.value)
    assert all(k in str(info.value) for k in ("onnx", "torch", "torchscript"))
    blocked = make_plugin_manager(load_entrypoints=False)
    blocked.set_blocked("qcloop.deploy.plugin")
    onnx_card = card.with_name("o.yaml")
    onnx_card.write_text(card.read_text().replace("tflite", "onnx"))
    with pytest.raises(ModelCardError, match=r"unknown model kind 'onnx' \(registered: ") as info:
        load_card_model(onnx_card, pm=blocked)
    assert "onnx," not in str(info.value) and "torch, torchscript" in str(info.value)


def test_missing_onnx_extra_is_named(
    unet_cards: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match="'onnx' extra"):
        load_card_model(unet_cards["onnx"])


def test_missing_model_file(unet_cards: dict[str, Path], tmp_path: Path) -> None:
    card = tmp_path / "card.yaml"
    card.write_text(unet_cards["onnx"].read_text())
    with pytest.raises(ModelCardError) as info:
        load_card_model(card)
    assert info.value.field == "path" and str(card) in str(info.value)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (("monai.networks.nets.UNet", "monai.networks.nets.NoSuchNet"), "module", "no class"),
        (("monai.networks.nets.UNet", "no_such_package.Net"), "module", "cannot import"),
        (("strides: [2]", "strides: [2], bogus: 1"), "params", "failed"),
        (("channels: [8, 16]", "channels: [4, 8]"), "path", "do not fit"),
        (("unet.pt", "unet.onnx"), "path", "not a weights-only PyTorch file"),
    ],
    ids=["no-class", "no-package", "bad-params", "wrong-weights", "not-weights"],
)
def test_torch_loader_errors_name_the_field(
    unet_cards: dict[str, Path], tmp_path: Path, change: tuple[str, str], field: str, words: str
) -> None:
    card = unet_cards["net"] / f"bad-{field}-{uuid.uuid4().hex[:6]}.yaml"
    card.write_text(unet_cards["torch"].read_text().replace(*change))
    with pytest.raises(ModelCardError) as info:
        load_card_model(card)
    assert info.value.field == field and words in str(info.value)
    assert str(info.value).startswith(str(card))


def test_torchscript_loader_refuses_other_files(unet_cards: dict[str, Path]) -> None:
    card = unet_cards["net"] / "bad-ts.yaml"
    card.write_text(unet_cards["torchscript"].read_text().replace("unet.ts", "unet.onnx"))
    with pytest.raises(ModelCardError, match="not a TorchScript archive") as info:
        load_card_model(card)
    assert info.value.field == "path"


def test_a_loader_must_return_an_external_model(unet_cards: dict[str, Path]) -> None:
    from qcloop.monitor import hookimpl

    class NotAModel:
        @hookimpl
        def register_model_kinds(self, register: Any) -> None:
            register("tflite", lambda card: object())

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(NotAModel(), name="not-a-model")
    card = unet_cards["net"] / "tflite.yaml"
    card.write_text(unet_cards["onnx"].read_text().replace("kind: onnx", "kind: tflite"))
    with pytest.raises(ModelCardError, match=r"plugin not-a-model.*not an ExternalModel"):
        load_card_model(card, pm=pm)


def test_predictor_validates_batch_size(unet_cards: dict[str, Path]) -> None:
    predictor = load_card_model(unet_cards["onnx"], batch_size=2)
    assert predictor.batch_size == 2
    with pytest.raises(ValueError, match="batch_size"):
        CardPredictor(predictor.card, predictor.model, batch_size=0)


# --------------------------------------------------------------------------- preprocessing


def _smooth_probabilities(shape: tuple[int, int, int], classes: int = 4) -> np.ndarray:
    """Smooth ``(X, Y, Z, C)`` probability maps."""
    x, y, z = shape
    gx = np.linspace(-1, 1, x)[:, None, None]
    gy = np.linspace(-1, 1, y)[None, :, None]
    gz = np.arange(z)[None, None, :]
    logits = np.stack(
        [2 * np.cos(2 * gx + k) * np.sin(3 * gy - k) + 0.4 * gz * k for k in range(classes)], -1
    )
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    ("shape", "spacing", "target", "size", "atol"),
    [
        ((72, 80, 3), 1.37, None, 64, 0.0),  # crop
        ((56, 60, 3), 1.37, None, 64, 0.0),  # pad
        ((72, 80, 3), 1.37, 1.5, 64, 0.01),  # resampled and cropped
        ((56, 60, 3), 1.2, 1.5, 64, 0.01),  # resampled and padded
    ],
    ids=["crop", "pad", "resampled-crop", "resampled-pad"],
)
def test_apply_probabilities_is_the_counterpart_of_restore(
    shape: tuple[int, int, int], spacing: float, target: float | None, size: int, atol: float
) -> None:
    transform = Preprocessor(size, target_spacing=target).transform_for(shape, (spacing,) * 3)
    original = _smooth_probabilities(shape)
    net = transform.apply_probabilities(original)
    assert net.shape == (shape[2], 4, size, size) and net.dtype == np.float32
    np.testing.assert_allclose(net.sum(axis=1), 1.0, atol=1e-5)
    # original grid -> net grid -> original grid, inside the window (2 voxels from its edge)
    window = transform.restore_labels(np.ones((shape[2], size, size), np.uint8)) == 1
    inner = ndimage.binary_erosion(window, np.ones((5, 5, 1), bool))
    back = transform.restore_probabilities(net)
    assert np.abs(back - original)[inner].max() <= atol + 1e-6
    # net grid -> original grid -> net grid, inside the image
    on_net = np.transpose(_smooth_probabilities((size, size, shape[2])), (2, 3, 0, 1))
    image = transform.apply_labels(np.ones(shape, np.uint8)) == 1
    inner_net = ndimage.binary_erosion(image, np.ones((1, 5, 5), bool))
    again = transform.apply_probabilities(transform.restore_probabilities(on_net))
    assert np.abs(np.moveaxis(again - on_net, 1, 3))[inner_net].max() <= atol + 1e-6
    # beyond the image: background
    assert np.all(net[:, 0][~image] == 1.0) and np.all(net[:, 1:][:, :, ~image[0]] == 0.0)


def test_apply_probabilities_checks_its_input() -> None:
    transform = Preprocessor(32).transform_for((30, 30, 2), (1.0, 1.0, 5.0))
    with pytest.raises(ValueError, match="expected"):
        transform.apply_probabilities(np.zeros((30, 30, 3, 4), np.float32))
    bad = np.full((30, 30, 2, 4), 0.25, np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        transform.apply_probabilities(bad)


def test_new_normalisations() -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(500.0, 100.0, (20, 24, 3)).astype(np.float32)
    minmax = Preprocessor(None, normalisation="minmax").normalise(volume)
    assert minmax.dtype == np.float32 and minmax.min() == 0.0 and minmax.max() == 1.0
    np.testing.assert_allclose(minmax, (volume - volume.min()) / np.ptp(volume), atol=1e-6)
    none = Preprocessor(None, normalisation="none").normalise(volume)
    np.testing.assert_array_equal(none, volume)
    full = Preprocessor(None, normalisation="percentile", percentiles=(0, 100)).normalise(volume)
    np.testing.assert_allclose(full, minmax, atol=1e-6)
    lo, hi = np.percentile(volume.astype(np.float64), (5, 95))
    narrow = Preprocessor(None, normalisation="percentile", percentiles=(5, 95)).normalise(volume)
    np.testing.assert_allclose(narrow, (np.clip(volume, lo, hi) - lo) / (hi - lo), atol=1e-6)
    constant = np.full((4, 4, 2), 7.0, np.float32)
    assert not Preprocessor(None, normalisation="minmax").normalise(constant).any()


def test_default_percentile_normalisation_is_unchanged() -> None:
    volume = np.random.default_rng(1).gamma(2.0, 100.0, (16, 16, 2))
    default = Preprocessor(None, normalisation="percentile")
    assert repr(default) == (
        "Preprocessor(size=None, target_spacing=None, divisor=1, normalisation='percentile')"
    )
    lo, hi = np.percentile(volume, (0.5, 99.5))
    expected = ((np.clip(volume, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    np.testing.assert_array_equal(default.normalise(volume), expected)


@pytest.mark.parametrize(
    "kwargs",
    [{"normalisation": "robust"}, {"percentiles": (50, 10)}, {"percentiles": (-1, 99)}],
)
def test_bad_normalisation_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Preprocessor(None, **kwargs)


def test_prepare_image_is_the_image_part_of_prepare() -> None:
    case = make_case(Path("."))
    pre = Preprocessor(64, target_spacing=1.5, divisor=4, normalisation="minmax")
    slices, transform = pre.prepare_image(case.image, case.spacing)
    prepared = pre.prepare(case)
    np.testing.assert_array_equal(slices, prepared.image)
    assert transform == prepared.transform
