"""The ONNX Runtime backend (``OrtRuntime``) and ``qcloop bench inference``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qcloop.deploy.onnx.errors import ExportError
from qcloop.deploy.onnx.export import export_run
from qcloop.deploy.onnx.runtime import (
    CPU,
    CUDA,
    OrtRuntime,
    cuda_usable,
    resolve_providers,
)
from qcloop.monitor.cli.main import cli
from qcloop.monitor.core.interfaces import Runtime
from qcloop.monitor.core.resolve import build_runtime
from qcloop.monitor.data import discover, load_case
from qcloop.monitor.ops.scoring import load_online_scorers
from qcloop.monitor.ops.torch_runtime import TorchRuntime

pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def onnx_dir(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SA models of ``tiny_run`` exported to ONNX."""
    out = tmp_path_factory.mktemp("ort") / "onnx"
    export_run(tiny_run, out, views=["SA"])
    return out


def test_same_pdc_ood_and_selection_as_torch(
    tiny_run: Path, tiny_cohort: Path, onnx_dir: Path
) -> None:
    torch_scorer = load_online_scorers(tiny_run, ["SA"])["SA"]
    ort_scorer = load_online_scorers(tiny_run, ["SA"], runtime="onnxruntime", onnx_dir=onnx_dir)[
        "SA"
    ]
    assert ort_scorer.runtime.name == "onnxruntime"
    sources = [s for s in discover(tiny_cohort) if s.view == "SA"][:2]
    for source in sources:
        case = load_case(source)
        a, b = torch_scorer.score(case), ort_scorer.score(case)
        assert b.ood == a.ood
        assert b.record["selection"] == a.record["selection"]
        for ca, cb in zip(a.record["candidates"], b.record["candidates"], strict=True):
            for structure in ("LV", "MYO", "RV"):
                assert cb[structure]["pdc"] == pytest.approx(ca[structure]["pdc"], abs=1e-3)
        assert np.mean(a.labels == b.labels) >= 0.999
        assert b.record["runtime"] == {"name": "onnxruntime", "providers": [CPU]}
        json.dumps(b.record, allow_nan=False)


def test_runtime_protocol_shapes_and_batching(tiny_run: Path, onnx_dir: Path) -> None:
    runtime = OrtRuntime.from_export(onnx_dir, "SA", batch_size=3, threads=1)
    assert isinstance(runtime, Runtime)
    assert (runtime.input_size, runtime.divisor, runtime.n_candidates) == (64, 8, 2)
    torch_rt = build_runtime("torch", tiny_run, "SA")
    assert isinstance(torch_rt, TorchRuntime)
    image = np.random.default_rng(1).standard_normal((7, 64, 64)).astype(np.float32)
    got, want = runtime.segment(image), torch_rt.segment(image)
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        assert g.shape == (7, 4, 64, 64) and g.dtype == np.float32
        np.testing.assert_allclose(g.sum(1), 1.0, atol=1e-5)
        assert np.abs(g - w).max() <= 1e-4
    rec = runtime.reconstruct(got[0])
    assert rec.shape == got[0].shape
    assert np.abs(rec - torch_rt.reconstruct(got[0])).max() <= 1e-4
    empty = runtime.segment(np.zeros((0, 64, 64), np.float32))
    assert [e.shape for e in empty] == [(0, 4, 64, 64)] * 2
    with pytest.raises(ValueError, match=r"expected slices \(Z, 64, 64\)"):
        runtime.segment(np.zeros((2, 32, 32), np.float32))
    with pytest.raises(ValueError, match="unknown runtime"):
        build_runtime("tensorflow", tiny_run, "SA")
    assert runtime.describe()["providers"] == runtime.providers()


@pytest.mark.skipif(cuda_usable(), reason="a usable GPU: the fallback cannot be observed")
def test_requested_cuda_falls_back_to_cpu_with_one_warning(
    onnx_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert resolve_providers(None) == [CPU]
    assert resolve_providers("cuda") == [CUDA, CPU]
    with caplog.at_level(logging.INFO, logger="qcloop.deploy.onnx.runtime"):
        runtime = OrtRuntime.from_export(onnx_dir, "SA", providers=[CUDA])
    assert runtime.providers() == [CPU]
    assert runtime.requested == [CUDA, CPU]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUDAExecutionProvider" in warnings[0].getMessage()
    assert any("providers in use: CPUExecutionProvider" in r.getMessage() for r in caplog.records)


def test_bad_exports_are_clear_errors(onnx_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no LA models"):
        OrtRuntime.from_export(onnx_dir, "LA")
    with pytest.raises(ExportError, match=r"manifest\.json: missing"):
        OrtRuntime.from_export(tmp_path, "SA")
    copy = tmp_path / "copy"
    shutil.copytree(onnx_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["views"]["SA"]["input_size"] = 128
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"candidate-0\.onnx: metadata input_size is '64'"):
        OrtRuntime.from_export(copy, "SA")
    shutil.copytree(onnx_dir, copy, dirs_exist_ok=True)
    with open(copy / "SA" / "qc.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ExportError, match=r"qc\.onnx: changed since the export"):
        OrtRuntime.from_export(copy, "SA")
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="unreadable manifest"):
        OrtRuntime.from_export(copy, "SA")


def test_bench_inference_smoke() -> None:
    """Tiny settings: every column and the PASS/MISS lines are printed (no timing asserted)."""
    result = CliRunner().invoke(
        cli,
        [
            "bench", "inference", "--sizes", "32", "--batches", "1", "--archs", "bn2",
            "--repeats", "1", "--warmup", "0", "--sgemm-size", "128", "--threads", "1",
            "--exporter", "torchscript",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.output
    for column in (
        "GFLOP/slice",
        "torch slices/s",
        "ORT slices/s",
        "ORT/torch",
        "torch GFLOP/s",
        "ORT GFLOP/s",
        "ORT/sgemm",
    ):
        assert column in out
    assert "| bn2 | 32 | 1 |" in out
    assert "load average" in out and "fp32 sgemm" in out and "1 threads" in out
    assert "ratio targets: " in out and "GFLOP/s target: " in out
    row = next(line for line in out.splitlines() if line.startswith("| bn2 | 32 | 1 |"))
    assert row.rstrip().endswith(("PASS |", "MISS |"))
    bad = CliRunner().invoke(cli, ["bench", "inference", "--sizes", "30", "--archs", "bn2"])
    assert bad.exit_code != 0 and "divisor" in bad.output


def test_the_runtime_names_its_missing_extra(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from qcloop.monitor.core.optional import MissingExtraError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the onnx extra were missing
    with pytest.raises(MissingExtraError, match=r"needs the 'onnx' extra.*qcloop\[onnx\]"):
        build_runtime("onnxruntime", tiny_run, "SA")


def test_deploy_is_a_plugin_like_any_other() -> None:
    """Blocked by name, the deploy plugin takes its runtime, commands and benchmarks with it;
    loading it imports none of the optional libraries."""
    import os
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from qcloop.monitor.cli.main import cli\n"
        "from qcloop.monitor.core.plugin_manager import get_plugin_manager\n"
        "top = CliRunner().invoke(cli, ['--help']).output\n"
        "bench = CliRunner().invoke(cli, ['bench', '--help']).output\n"
        "names = ' '.join(get_plugin_manager().runtimes().names())\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'fastapi', 'uvicorn') if m in sys.modules]\n"
        "print(json.dumps([top, bench, names, heavy]))\n"
    )

    def run(block: str) -> tuple[str, str, str, list[str]]:
        env = {**os.environ, "QCLOOP_BLOCK_PLUGINS": block}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        top, bench, names, heavy = json.loads(out.stdout)
        return top, bench, names, heavy

    top, bench, names, heavy = run("")
    assert all(f"  {c} " in top for c in ("serve", "export-onnx", "export-triton"))
    assert all(f"  {c} " in bench for c in ("inference", "metrics", "serve"))
    assert names.split() == ["onnxruntime", "torch"] and heavy == []
    top, bench, names, _ = run("qcloop.deploy.plugin")
    assert not any(f"  {c} " in top for c in ("serve", "export-onnx", "export-triton"))
    assert "  metrics " in bench and "  inference " not in bench and "  serve " not in bench
    assert names.split() == ["torch"]
