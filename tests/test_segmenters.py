"""Tests for the BN1 and BN2 2D U-Net segmenters (tiny sizes unless a test says otherwise)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcloop.monitor.core.interfaces import Segmenter
from qcloop.segmenters.bn1 import BN1UNet
from qcloop.segmenters.bn2 import BN2UNet


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from 2 threads, and lose 5-10x when another process is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_bn1(**kw: object) -> BN1UNet:
    params: dict[str, object] = {"base_width": 8, "max_width": 32, "depth": 4}
    params.update(kw)
    return BN1UNet(**params)  # type: ignore[arg-type]


def tiny_bn2(**kw: object) -> BN2UNet:
    params: dict[str, object] = {"base_width": 8, "depth": 4}
    params.update(kw)
    return BN2UNet(**params)  # type: ignore[arg-type]


# ---------------------------------------------------------------- hand-written references
def conv_block_params(a: int, b: int) -> int:
    """3x3 conv a->b with bias, plus BatchNorm(b) weight and bias."""
    return 9 * a * b + b + 2 * b


def bn1_param_count(widths: list[int], in_ch: int, n_cls: int) -> int:
    depth = len(widths)
    total, prev = 0, in_ch
    for w in widths:
        total += conv_block_params(prev, w) + conv_block_params(w, w)
        prev = w
    for j in range(depth - 1):
        total += 4 * widths[j + 1] * widths[j]  # 2x2 transposed conv, no bias
        total += conv_block_params(2 * widths[j], widths[j]) + conv_block_params(
            widths[j], widths[j]
        )
    for j in range(max(1, depth - 2)):
        total += widths[j] * n_cls  # 1x1 head, no bias
    return total


def bn2_param_count(widths: list[int], in_ch: int, n_cls: int, summed: list[int]) -> int:
    depth = len(widths)
    total, prev = 0, in_ch
    for w in widths:
        total += conv_block_params(prev, w) + conv_block_params(w, w)
        prev = w
    for j in range(depth - 1):
        total += conv_block_params(widths[j + 1] + widths[j], widths[j])
        total += conv_block_params(widths[j], widths[j])
    for j in [0, *summed]:
        total += widths[j] * n_cls + n_cls  # 1x1 head with bias
    return total


# ---------------------------------------------------------------- shapes and the contract
@pytest.mark.parametrize(
    ("depth", "sizes", "weights"),
    [
        (4, [64, 32], [2 / 3, 1 / 3]),
        (5, [64, 32, 16], [4 / 7, 2 / 7, 1 / 7]),
    ],
)
def test_bn1_outputs_train_and_eval(depth: int, sizes: list[int], weights: list[float]) -> None:
    torch.manual_seed(0)
    model = tiny_bn1(depth=depth)
    x = torch.randn(2, 1, 64, 64)
    model.train()
    outs = model(x)
    assert isinstance(outs, list)
    assert [tuple(o.shape) for o in outs] == [(2, 4, s, s) for s in sizes]
    w = model.deep_supervision_weights()
    assert len(w) == len(outs)
    assert w == pytest.approx(weights)
    assert math.isclose(sum(w), 1.0)
    assert model.deep_supervision_strides() == [64 // s for s in sizes]
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor)
    assert tuple(y.shape) == (2, 4, 64, 64)
    assert torch.isfinite(y).all()


def test_bn1_without_deep_supervision_returns_one_tensor() -> None:
    model = tiny_bn1(deep_supervision=False).train()
    y = model(torch.randn(2, 1, 64, 64))
    assert isinstance(y, torch.Tensor)
    assert tuple(y.shape) == (2, 4, 64, 64)
    assert model.deep_supervision_weights() == [1.0]
    # the heads exist either way, so checkpoints load across the flag
    other = tiny_bn1(deep_supervision=True)
    other.load_state_dict(model.state_dict())


def test_bn2_outputs_train_and_eval() -> None:
    torch.manual_seed(0)
    model = tiny_bn2(num_classes=3)
    x = torch.randn(2, 1, 96, 64)
    outs = model.train()(x)
    assert isinstance(outs, list) and len(outs) == 1
    assert tuple(outs[0].shape) == (2, 3, 96, 64)
    assert model.deep_supervision_weights() == [1.0]
    with torch.no_grad():
        y = model.eval()(x)
    assert isinstance(y, torch.Tensor)
    assert tuple(y.shape) == (2, 3, 96, 64)
    flat = tiny_bn2(deep_supervision=False).train()(x)
    assert isinstance(flat, torch.Tensor)


def test_models_satisfy_segmenter_protocol() -> None:
    for model in (tiny_bn1(), tiny_bn2()):
        assert isinstance(model, Segmenter)
        assert isinstance(model, nn.Module)
        assert model.in_channels == 1


def test_plugin_registers_both_architectures() -> None:
    from qcloop.segmenters import plugin

    found: dict[str, object] = {}
    plugin.register_segmenters(register=lambda name, factory: found.__setitem__(name, factory))
    assert set(found) == {"bn1", "bn2"}
    assert isinstance(found["bn1"](base_width=4, max_width=8, depth=3), BN1UNet)  # type: ignore[operator]
    assert isinstance(found["bn2"](base_width=4, depth=3), BN2UNet)  # type: ignore[operator]


# ---------------------------------------------------------------- divisor and input checks
@pytest.mark.parametrize(
    ("model", "divisor"),
    [
        (lambda: tiny_bn1(depth=4), 8),
        (lambda: tiny_bn1(depth=6), 32),
        (lambda: tiny_bn2(depth=4), 8),
        (lambda: tiny_bn2(depth=5), 16),
    ],
)
def test_divisor_and_non_multiple_input(model, divisor: int) -> None:  # type: ignore[no-untyped-def]
    m = model().eval()
    assert m.divisor == divisor
    with torch.no_grad():
        assert tuple(m(torch.zeros(1, 1, 2 * divisor, divisor)).shape[2:]) == (2 * divisor, divisor)
        with pytest.raises(ValueError, match=f"multiples of {divisor}"):
            m(torch.zeros(1, 1, 2 * divisor + 4, 2 * divisor))
        with pytest.raises(ValueError, match=f"multiples of {divisor}"):
            m(torch.zeros(1, 1, 2 * divisor, divisor // 2))


@pytest.mark.parametrize("shape", [(1, 2, 64, 64), (1, 64, 64), (64, 64)])
def test_wrong_input_shape_raises(shape: tuple[int, ...]) -> None:
    for m in (tiny_bn1().eval(), tiny_bn2().eval()):
        with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
            m(torch.zeros(shape))


@pytest.mark.parametrize(
    ("factory", "kw", "match"),
    [
        (BN1UNet, {"depth": 1}, "depth"),
        (BN1UNet, {"base_width": 0}, "base_width"),
        (BN1UNet, {"base_width": 64, "max_width": 32}, "max_width"),
        (BN1UNet, {"num_classes": 1}, "num_classes"),
        (BN1UNet, {"in_channels": 0}, "in_channels"),
        (BN1UNet, {"depth": 4.0}, "depth"),
        (BN1UNet, {"depth": True}, "depth"),
        (BN1UNet, {"leaky_slope": -0.1}, "leaky_slope"),
        (BN1UNet, {"deep_supervision": 1}, "deep_supervision"),
        (BN2UNet, {"dropout": 1.0}, "dropout"),
        (BN2UNet, {"dropout": float("nan")}, "dropout"),
        (BN2UNet, {"depth": 0}, "depth"),
        (BN2UNet, {"base_width": -8}, "base_width"),
    ],
)
def test_invalid_parameters_raise(factory, kw: dict[str, object], match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        factory(**kw)


# ---------------------------------------------------------------- reference architecture
def test_bn1_reference_widths_and_modules() -> None:
    model = BN1UNet()
    d = model.describe()
    widths = [32, 64, 128, 256, 480, 480]
    assert d["widths"] == widths
    assert d["depth"] == 6 and d["divisor"] == 32
    assert d["parameters"] == bn1_param_count(widths, 1, 4)
    assert d["parameters"] == sum(p.numel() for p in model.parameters())
    # encoder: first conv of every stage but the first has stride 2
    first_convs = [stage[0][0] for stage in model.encoder]
    assert [c.stride for c in first_convs] == [(1, 1)] + [(2, 2)] * 5
    assert [c.out_channels for c in first_convs] == widths
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 2 * 6 + 2 * 5
    assert sum(c.stride == (2, 2) for c in convs) == 5
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert sorted((u.in_channels, u.out_channels) for u in ups) == sorted(
        (widths[j + 1], widths[j]) for j in range(5)
    )
    assert all(u.kernel_size == (2, 2) and u.stride == (2, 2) for u in ups)
    heads = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert sorted(h.in_channels for h in heads) == [32, 64, 128, 256]
    assert not any(isinstance(m, (nn.MaxPool2d, nn.Dropout)) for m in model.modules())
    # Conv -> BN -> LeakyReLU(0.01)
    block = model.encoder[0][0]
    assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU]
    assert block[2].negative_slope == 0.01


def test_bn2_reference_widths_and_modules() -> None:
    model = BN2UNet()
    d = model.describe()
    widths = [48, 96, 192, 384, 768]
    assert d["widths"] == widths
    assert d["depth"] == 5 and d["divisor"] == 16
    assert d["parameters"] == bn2_param_count(widths, 1, 4, [1, 2])
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
    ups = [m for m in model.modules() if isinstance(m, nn.Upsample)]
    assert ups and all(u.mode == "nearest" for u in ups)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == 0.3 for m in drops)
    # dropout only in the two deepest encoder levels
    with_dropout = [any(isinstance(m, nn.Dropout) for m in s.modules()) for s in model.encoder]
    assert with_dropout == [False, False, False, True, True]
    # Conv -> LeakyReLU -> BatchNorm
    block = model.encoder[0][0]
    assert [type(m) for m in block] == [nn.Conv2d, nn.LeakyReLU, nn.BatchNorm2d]
    heads = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert sorted(h.in_channels for h in heads) == [48, 96, 192]


@pytest.mark.parametrize("factory", [BN1UNet, BN2UNet])
def test_reference_forward_256(factory) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = factory().eval()
    with torch.no_grad():
        y = model(torch.randn(1, 1, 256, 256))
    assert tuple(y.shape) == (1, 4, 256, 256)
    assert torch.isfinite(y).all()


def test_tiny_parameter_counts_match_formula() -> None:
    assert tiny_bn1().describe()["parameters"] == bn1_param_count([8, 16, 32, 32], 1, 4)
    assert tiny_bn2().describe()["parameters"] == bn2_param_count([8, 16, 32, 64], 1, 4, [1, 2])
    m = tiny_bn2(depth=3, deep_supervision=False)
    assert m.describe()["parameters"] == bn2_param_count([8, 16, 32], 1, 4, [])


def test_kaiming_init_for_leaky_relu() -> None:
    model = BN1UNet()
    conv = model.encoder[5][1][0]  # 480 -> 480, 3x3
    fan_in = 480 * 9
    expected = math.sqrt(2.0 / (1.0 + 0.01**2)) / math.sqrt(fan_in)
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.02)
    assert conv.weight.mean().abs().item() < 0.05 * expected
    assert torch.count_nonzero(conv.bias) == 0
    bn = model.encoder[5][1][1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


# ---------------------------------------------------------------- BN2's summed deep supervision
def test_bn2_summed_heads_enter_the_final_logits() -> None:
    torch.manual_seed(0)
    model = tiny_bn2(depth=4).eval()
    assert sorted(model.summed_heads.keys()) == ["1", "2"]
    with torch.no_grad():
        for conv in (model.head, model.summed_heads["1"]):
            conv.weight.zero_()
            conv.bias.zero_()
        y = model(torch.randn(2, 1, 64, 64))
        # only the 1/4-resolution head is left: the logits are constant on 4x4 blocks
        blocks = y.reshape(2, 4, 16, 4, 16, 4)
        assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))
        assert y.abs().max() > 0
        model.summed_heads["2"].weight.zero_()
        model.summed_heads["2"].bias.zero_()
        assert torch.count_nonzero(model(torch.randn(2, 1, 64, 64))) == 0
    assert len(tiny_bn2(deep_supervision=False).summed_heads) == 0


def test_bn2_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = tiny_bn2(depth=4)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        a, b = model.train()(x)[0], model.train()(x)[0]
        assert not torch.allclose(a, b)
        assert torch.equal(model.eval()(x), model.eval()(x))


# ---------------------------------------------------------------- optimisers and schedules
def test_bn1_optimizer_and_poly_schedule() -> None:
    model = tiny_bn1()
    opt, sched = model.make_optimizer(total_epochs=10)
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.01)
    assert group["momentum"] == 0.99 and group["nesterov"] is True
    for epoch in range(1, 11):
        opt.step()
        sched.step()
        expected = 0.01 * (1 - epoch / 10) ** 0.9
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    opt2, _ = model.make_optimizer(5, lr=0.1)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)


def test_bn2_optimizer_and_exponential_schedule() -> None:
    model = tiny_bn2()
    opt, sched = model.make_optimizer(total_epochs=10)
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    for epoch in range(1, 4):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 * 0.985**epoch, rel=1e-9)
    opt2, _ = model.make_optimizer(10, lr=1e-3)
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("model", [tiny_bn1(), tiny_bn2()])
@pytest.mark.parametrize(("epochs", "lr"), [(0, None), (10, 0.0), (10, -1.0), (10, float("inf"))])
def test_make_optimizer_rejects_bad_arguments(model, epochs: int, lr: float | None) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        model.make_optimizer(epochs, lr=lr)


# ---------------------------------------------------------------- a tiny learning problem
def disc_and_ring(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of a bright disc (LV, label 1) inside a grey ring (MYO, label 2), plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = np.zeros((n, 1, size, size), np.float32)
    labels = np.zeros((n, size, size), np.int64)
    for i in range(n):
        cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
        r_in = rng.uniform(size * 0.1, size * 0.18)
        r_out = r_in + rng.uniform(size * 0.06, size * 0.1)
        r = np.hypot(yy - cy, xx - cx)
        labels[i][r < r_out] = 2
        labels[i][r < r_in] = 1
        images[i, 0] = np.where(labels[i] == 1, 1.0, np.where(labels[i] == 2, 0.4, 0.0))
    images += rng.normal(0, 0.1, images.shape).astype(np.float32)
    return torch.from_numpy(images), torch.from_numpy(labels)


def supervised_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    outs = model(x)
    outs = outs if isinstance(outs, list) else [outs]
    total = x.new_zeros(())
    for w, out in zip(model.deep_supervision_weights(), outs, strict=True):
        target = F.interpolate(y[:, None].float(), size=out.shape[2:], mode="nearest")
        total = total + w * F.cross_entropy(out, target[:, 0].long())
    return total


@pytest.mark.parametrize(("factory", "lr"), [(tiny_bn1, 0.01), (tiny_bn2, 5e-3)])
def test_a_few_steps_reduce_cross_entropy(factory, lr: float) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    x, y = disc_and_ring(4, 64, seed=1)
    model = factory().train()
    opt, _ = model.make_optimizer(total_epochs=1, lr=lr)
    with torch.no_grad():
        start = supervised_loss(model, x, y).item()
    for _ in range(20):
        opt.zero_grad()
        loss = supervised_loss(model, x, y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = supervised_loss(model, x, y).item()
    assert math.isfinite(end)
    assert end < 0.5 * start, (start, end)


# ---------------------------------------------------------------- ONNX export
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("factory", [tiny_bn1, tiny_bn2])
def test_onnx_export_with_dynamic_batch_and_size(factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = factory().eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        model,
        (torch.randn(1, 1, 64, 64),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={
            "image": {0: "batch", 2: "height", 3: "width"},
            "logits": {0: "batch", 2: "height", 3: "width"},
        },
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 48, 80)
    (got,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (3, 4, 48, 80)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
