"""``qcloop export-onnx`` of calibrated runs (``deploy/onnx/card_export.py``): a ``torch`` card's
module is converted and checked, an ``onnx`` card's file is copied unchanged, and the ONNX
runtime then scores cases as the in-process runtime does; kinds that cannot be exported say
what to do instead, and leave nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli
from qcloop.monitor.data import discover, load_case
from qcloop.monitor.method.calibrate import calibrate_model
from qcloop.monitor.ops.scoring import load_online_scorers
from tests.helpers import torch_card

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SWAPPED_LABELS = "{0: background, 1: RV, 2: MYO, 3: LV}"


def _export(run: Path, out: Path, *extra: str) -> CliRunner:
    """``qcloop export-onnx`` of the run's SA view (torchscript exporter: the faster one)."""
    args = ["export-onnx", "--run", str(run), "--out", str(out), "--view", "SA"]
    return CliRunner().invoke(cli, [*args, "--exporter", "torchscript", *extra])


@pytest.fixture(scope="module")
def torch_card_run(
    tiny_run: Path, tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny SA candidate as a torch card with its own grid, calibrated on vendor A."""
    root = tmp_path_factory.mktemp("card-export")
    card = torch_card(tiny_run, root / "vendor", input_={"spacing_mm": 5.0, "size": 48})
    calibrate_model(tiny_run, card, tiny_cohort, root / "run", views=["SA"], where={"vendor": "A"})
    return root / "run"


@pytest.fixture(scope="module")
def exported(torch_card_run: Path) -> Path:
    out = torch_card_run / "onnx"  # where serve's onnxruntime runtime looks by default
    result = _export(torch_card_run, out)
    assert result.exit_code == 0, result.output
    assert "SA/model.onnx: parity ok" in result.output
    return out


def _same_scores(run: Path, onnx_dir: Path, cohort: Path) -> None:
    """The ONNX runtime scores three SA cases as the in-process runtime does."""
    ort = load_online_scorers(run, ["SA"], runtime="onnxruntime", onnx_dir=onnx_dir)["SA"]
    torch_ = load_online_scorers(run, ["SA"], runtime="torch")["SA"]
    for source in [s for s in discover(cohort) if s.view == "SA"][:3]:
        case = load_case(source)
        a, b = ort.score(case), torch_.score(case)
        assert a.record["runtime"]["providers"] == ["CPUExecutionProvider"]
        assert (a.labels == b.labels).mean() > 0.999
        for s in ("LV", "MYO", "RV"):
            pa, pb = (r.record["candidates"][0][s]["pdc"] for r in (a, b))
            assert abs(pa - pb) < 0.02
        assert a.record["ood"] == b.record["ood"]


def test_a_torch_card_is_converted_and_served_by_onnx_runtime(
    torch_card_run: Path, exported: Path, tiny_cohort: Path
) -> None:
    manifest = json.loads((exported / "manifest.json").read_text())
    entry = manifest["views"]["SA"]["candidates"][0]
    assert entry["card"] == "SA/card.yaml" and entry["source_kind"] == "torch"
    assert entry["parity"]["argmax_agreement"] > 0.999
    card = yaml.safe_load((exported / "SA" / "card.yaml").read_text())
    assert card["kind"] == "onnx" and card["path"] == "model.onnx"
    assert card["input"]["spacing_mm"] == 5.0 and "module" not in card
    assert (exported / "SA" / "qc.onnx").is_file()
    _same_scores(torch_card_run, exported, tiny_cohort)


def test_an_onnx_card_is_copied_unchanged(
    tiny_run: Path, exported: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    """The exported card is itself an onnx card: calibrated, its export copies the file."""
    from qcloop.monitor.method.calibrate import file_sha256

    run = tmp_path / "run"
    calibrate_model(
        tiny_run, exported / "SA" / "card.yaml", tiny_cohort, run, views=["SA"],
        where={"vendor": "A"},
    )  # fmt: skip
    result = _export(run, tmp_path / "onnx")
    assert result.exit_code == 0, result.output
    assert "SA/model.onnx: copied" in result.output
    digest = file_sha256(exported / "SA" / "model.onnx")
    assert file_sha256(tmp_path / "onnx" / "SA" / "model.onnx") == digest
    _same_scores(run, tmp_path / "onnx", tiny_cohort)


def test_a_moved_card_model_is_refused_by_the_runtime(exported: Path, tmp_path: Path) -> None:
    import shutil

    from qcloop.deploy.onnx.errors import ExportError
    from qcloop.deploy.onnx.runtime import OrtRuntime

    copy = tmp_path / "onnx"
    shutil.copytree(exported, copy)
    (copy / "SA" / "model.onnx").write_bytes(b"not the exported model")
    with pytest.raises(ExportError, match="changed since the export"):
        OrtRuntime.from_export(copy, "SA")


def test_a_torchscript_card_says_what_to_do_instead(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    import torch

    from qcloop.monitor.method.external import load_card_model

    path = torch_card(tiny_run, tmp_path / "vendor")
    module = load_card_model(path).model.module
    torch.jit.trace(module.eval(), torch.zeros(1, 1, 64, 64)).save(
        str(tmp_path / "vendor" / "m.ts")
    )
    card = yaml.safe_load(path.read_text())
    card.update({"kind": "torchscript", "path": "m.ts"})
    del card["module"], card["params"]
    path.write_text(yaml.safe_dump(card))
    run = tmp_path / "run"
    calibrate_model(tiny_run, path, tiny_cohort, run, views=["SA"], where={"vendor": "A"})
    result = _export(run, tmp_path / "onnx")
    assert result.exit_code == 1
    assert "a torchscript model card cannot be exported to ONNX here" in result.output
    assert "--runtime torch" in result.output
    assert not (tmp_path / "onnx").exists()


def test_a_triton_repository_of_a_card_run(exported: Path, tmp_path: Path) -> None:
    """The card's model as it is and the QC module; the card itself in the summary, for the
    client that prepares the cases."""
    from qcloop.deploy.triton.check import check_repository

    repo = tmp_path / "triton"
    result = CliRunner().invoke(cli, ["export-triton", "--onnx", str(exported), "--out", str(repo)])
    assert result.exit_code == 0, result.output
    summary = json.loads((repo / "qcloop-repository.json").read_text())
    assert sorted(summary["models"]) == ["sa_card_model", "sa_qc"]
    assert summary["models"]["sa_card_model"]["role"] == "card-model"
    assert summary["cards"]["SA"]["input"]["spacing_mm"] == 5.0
    model = (repo / "sa_card_model" / "1" / "model.onnx").read_bytes()
    assert model == (exported / "SA" / "model.onnx").read_bytes()
    assert check_repository(repo) == []


def test_the_exported_card_run_goes_live(
    torch_card_run: Path, exported: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    """``qcloop monitor`` scores an inbox with the card run, and ``qcloop serve`` answers with
    the card's model on ONNX Runtime."""
    from tests.live_support import monitor_once, serve_one

    records = monitor_once(torch_card_run, tiny_cohort, "SA", tmp_path, 4)
    assert all(0.0 <= r["candidates"][0]["RV"]["pdc"] <= 1.0 for r in records)
    body = serve_one(torch_card_run, tiny_cohort, "SA", "onnxruntime")
    assert body["record"]["runtime"]["providers"] == ["CPUExecutionProvider"]
