"""Model cards: the format, its validation, errors that name the card and the field, the label
map to qcloop's order, and the ``model_kinds`` plugin kind."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli
from qcloop.monitor.core.model_card import (
    CardInput,
    ModelCard,
    ModelCardError,
    load_card,
)
from qcloop.monitor.core.plugin_manager import COMPONENT_KINDS, make_plugin_manager

LABELS = "{0: background, 1: RV, 2: MYO, 3: LV}"


def write_card(folder: Path, body: str, name: str = "card.yaml", model: str = "model.onnx") -> Path:
    """A card file in ``folder`` (and an empty model file named ``model``)."""
    if model:
        (folder / model).write_bytes(b"")
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def onnx_card(folder: Path, extra: str = "", labels: str = LABELS) -> Path:
    return write_card(
        folder,
        f"""\
        kind: onnx
        path: model.onnx
        views: [SA]
        input: {{spacing_mm: 1.5, size: 64, divisor: 16, normalise: percentile}}
        output:
          activation: softmax
          labels: {labels}
        {extra}""",
    )


def card_error(path: Path) -> ModelCardError:
    with pytest.raises(ModelCardError) as info:
        load_card(path)
    return info.value


# --------------------------------------------------------------------------- the format


def test_a_full_card_loads(tmp_path: Path) -> None:
    card = load_card(onnx_card(tmp_path))
    assert card.kind == "onnx" and card.views == ("SA",)
    assert card.input == CardInput(spacing_mm=1.5, size=64, divisor=16, normalise="percentile")
    assert card.input.percentiles == (0.5, 99.5)
    assert card.output.activation == "softmax" and card.output.num_classes == 4
    assert card.card_path == tmp_path / "card.yaml"
    assert card.resolved_path == (tmp_path / "model.onnx").resolve()
    assert card.module is None and card.params is None


def test_defaults_and_case_insensitive_names(tmp_path: Path) -> None:
    path = write_card(
        tmp_path,
        """\
        kind: torchscript
        path: sub/net.ts
        views: [sa, LA]
        output: {labels: {0: BG, 1: lv, 2: Myocardium, 3: Rv}}
        """,
        model="",
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "net.ts").write_bytes(b"")
    card = load_card(path)
    assert card.views == ("SA", "LA")
    assert card.input == CardInput()  # native grid, any size, z-score
    assert card.input.size is None and card.input.divisor == 1
    assert card.output.activation == "softmax"
    np.testing.assert_array_equal(card.qcloop_index(), [0, 1, 2, 3])
    assert card.resolved_path == (tmp_path / "sub" / "net.ts").resolve()


def test_qcloop_index_permutes_and_maps_extra_classes_to_background(tmp_path: Path) -> None:
    card = load_card(onnx_card(tmp_path, labels="{0: bg, 1: RV, 2: MYO, 3: LV, 4: ignore, 5: bg}"))
    index = card.qcloop_index()
    assert index.dtype.kind == "i"
    np.testing.assert_array_equal(index, [0, 3, 2, 1, 0, 0])


def test_to_dict_is_json_and_reads_back(tmp_path: Path) -> None:
    card = load_card(onnx_card(tmp_path))
    data = json.loads(json.dumps(card.to_dict()))
    assert data["kind"] == "onnx" and data["views"] == ["SA"]
    assert data["output"]["labels"] == {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}
    again = ModelCard.from_dict(data, tmp_path / "card.yaml")
    assert again == card and again.qcloop_index().tolist() == card.qcloop_index().tolist()


def test_torch_card_takes_module_and_params(tmp_path: Path) -> None:
    path = write_card(
        tmp_path,
        """\
        kind: torch
        path: weights.pt
        module: monai.networks.nets.UNet
        params: {spatial_dims: 2, in_channels: 1, out_channels: 4, channels: [8, 16], strides: [2]}
        views: [SA]
        output: {labels: {0: background, 1: LV, 2: MYO, 3: RV}}
        """,
        model="weights.pt",
    )
    card = load_card(path)
    assert card.module == "monai.networks.nets.UNet"
    assert card.module_params["channels"] == [8, 16]


def test_nnunet_card_takes_a_folder(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    path = write_card(
        tmp_path,
        """\
        kind: nnunet
        path: results
        views: [SA]
        output: {labels: {0: background, 1: RV, 2: MYO, 3: LV}}
        """,
        model="",
    )
    card = load_card(path)
    assert card.resolved_path.is_dir()


# --------------------------------------------------------------------------- errors


def test_missing_model_file_names_path(tmp_path: Path) -> None:
    card = load_card(onnx_card(tmp_path))
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ModelCardError) as info:
        _ = card.resolved_path
    assert info.value.field == "path"
    assert str(info.value).startswith(f"{tmp_path / 'card.yaml'}: path: ")
    assert "model.onnx does not exist" in str(info.value)


def test_labels_missing_myo(tmp_path: Path) -> None:
    error = card_error(onnx_card(tmp_path, labels="{0: background, 1: RV, 2: LV}"))
    assert error.field == "output.labels"
    assert str(error) == f"{tmp_path / 'card.yaml'}: output.labels: MYO missing"


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ("{0: bg, 1: LV, 2: MYO, 3: RV, 4: LV}", "LV appears 2 times"),
        ("{0: bg, 1: LV, 2: MYO, 3: aorta}", "unknown label name"),
        ("{0: bg, 1: LV, 2: MYO, 4: RV}", "class indices must be 0..3"),
    ],
    ids=["twice", "unknown-name", "gap"],
)
def test_bad_label_maps(tmp_path: Path, labels: str, problem: str) -> None:
    error = card_error(onnx_card(tmp_path, labels=labels))
    assert error.field == "output.labels" and problem in str(error)


def test_torch_without_module(tmp_path: Path) -> None:
    path = write_card(
        tmp_path,
        f"kind: torch\npath: w.pt\nviews: [SA]\noutput: {{labels: {LABELS}}}\n",
        model="w.pt",
    )
    error = card_error(path)
    assert error.field == "module" and "required for kind torch" in str(error)


@pytest.mark.parametrize("field", ["params: {a: 1}", "module: x.Y"])
def test_module_and_params_only_for_torch(tmp_path: Path, field: str) -> None:
    error = card_error(onnx_card(tmp_path, extra=field))
    assert error.field == field.split(":")[0]
    assert "only for kind torch, not 'onnx'" in str(error)


def test_unknown_fields_are_errors(tmp_path: Path) -> None:
    error = card_error(onnx_card(tmp_path, extra="device: cuda"))
    assert error.problems == [("device", "unknown field")]
    path = write_card(
        tmp_path,
        f"kind: onnx\npath: model.onnx\nviews: [SA]\ninput: {{size: 64, crop: 1}}\n"
        f"output: {{labels: {LABELS}}}\n",
        name="c2.yaml",
    )
    assert card_error(path).problems == [("input.crop", "unknown field")]


@pytest.mark.parametrize(
    ("input_", "field"),
    [
        ("{size: 72, divisor: 16}", "input.size"),
        ("{normalise: robust}", "input.normalise"),
        ("{percentiles: [99, 1]}", "input.percentiles"),
        ("{spacing_mm: 0}", "input.spacing_mm"),
    ],
)
def test_bad_input_sections(tmp_path: Path, input_: str, field: str) -> None:
    path = write_card(
        tmp_path,
        f"kind: onnx\npath: model.onnx\nviews: [SA]\ninput: {input_}\noutput: {{labels: {LABELS}}}\n",
    )
    assert card_error(path).field == field


def test_several_problems_are_listed_once_each(tmp_path: Path) -> None:
    path = write_card(tmp_path, "kind: onnx\npath: model.onnx\nviews: [XA]\n")
    error = card_error(path)
    fields = [field for field, _ in error.problems]
    assert fields == ["views.0", "output"]
    assert str(error).count(str(path)) == 1


def test_unreadable_and_malformed_cards(tmp_path: Path) -> None:
    assert card_error(tmp_path / "absent.yaml").field == "card"
    (tmp_path / "list.yaml").write_text("- kind: onnx\n")
    assert "expected a mapping" in str(card_error(tmp_path / "list.yaml"))
    (tmp_path / "broken.yaml").write_text("kind: [onnx\n")
    error = card_error(tmp_path / "broken.yaml")
    assert error.field == "card" and "not valid YAML" in str(error) and "\n" not in str(error)


def test_card_error_is_a_value_error() -> None:
    error = ModelCardError("c.yaml", "kind", "unknown")
    assert isinstance(error, ValueError) and str(error) == "c.yaml: kind: unknown"
    assert str(ModelCardError(None, "kind", "x")) == "model card: kind: x"


# --------------------------------------------------------------------------- the plugin kind


def test_model_kinds_is_a_component_kind() -> None:
    assert COMPONENT_KINDS["model_kinds"] == ("register_model_kinds", "model kind")
    kinds = make_plugin_manager(load_entrypoints=False).model_kinds()
    assert {"onnx", "torch", "torchscript"} <= set(kinds.names())
    assert kinds.plugin_of("torch") == "qcloop.segmenters.external"
    assert kinds.plugin_of("torchscript") == "qcloop.segmenters.external"
    assert kinds.plugin_of("onnx") == "qcloop.deploy.plugin"
    assert "unknown model kind 'nnunet'" in kinds.unknown_message("nnunet")


def test_qcloop_plugins_lists_model_kinds(plugin_env: pytest.MonkeyPatch) -> None:
    plugin_env.setenv("QCLOOP_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = CliRunner().invoke(cli, ["plugins", "--all", "--json"])
    assert result.exit_code == 0, result.output
    by_name = {entry["name"]: entry for entry in json.loads(result.output)}
    external = by_name["qcloop.segmenters.external"]
    assert external["components"] == {"model_kinds": ["torch", "torchscript"]}
    assert "register_model_kinds" in external["hooks"]
    assert by_name["qcloop.deploy.plugin"]["components"]["model_kinds"] == ["onnx"]
