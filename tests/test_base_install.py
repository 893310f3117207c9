"""The base install alone (no extra) runs the core and the default method, and every command
that needs an extra says which one.

A fresh virtual environment gets ``torch==2.13.0`` (a CPU build from local disk on the project's
machines) and then ``pip install <this repository>`` with no extra: no MLflow, ONNX, FastAPI or
matplotlib. In it, tiny phantoms are generated, a tiny model set is trained and assessed through
the ``qcloop`` command line. Slow (a venv and an install): marked ``slow``, run in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

from qcloop.monitor.core.config import save_config
from tests.helpers import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]
TORCH_SPEC = os.environ.get("QCLOOP_TEST_TORCH_SPEC", "torch==2.13.0")
#: what the base install must not bring (each belongs to an extra).
EXTRA_ONLY = ("mlflow", "onnxruntime", "onnx", "fastapi", "matplotlib")

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def base_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding torch and qcloop's base install only; returns its bin folder."""
    root = tmp_path_factory.mktemp("base-install")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    bin_dir = root / "venv" / "bin"
    pip = [
        str(bin_dir / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    _run([*pip, TORCH_SPEC], root)
    _run([*pip, str(ROOT)], root)  # a regular (not editable) install, no extra
    return bin_dir


def test_base_install_has_no_extra(base_env: Path, tmp_path: Path) -> None:
    code = (
        "import importlib.util, json\n"
        f"print(json.dumps([m for m in {EXTRA_ONLY!r} if importlib.util.find_spec(m)]))\n"
    )
    present = json.loads(_run([str(base_env / "python"), "-c", code], tmp_path))
    assert present == [], f"the base install brought extras' packages: {present}"


def test_base_install_serves_the_monitor_endpoint(base_env: Path, tmp_path: Path) -> None:
    """The monitor's HTTP endpoint (starlette + uvicorn) is part of the base install."""
    code = (
        "import urllib.request\n"
        "from qcloop.monitor.core.http_endpoint import HttpEndpoint\n"
        "from qcloop.monitor.ops.http_app import monitor_app\n"
        "e = HttpEndpoint(monitor_app(lambda: {'status': 'ok'}, None)).start()\n"
        "print(urllib.request.urlopen(e.url + '/healthz', timeout=10).read().decode())\n"
        "e.close()\n"
    )
    assert json.loads(_run([str(base_env / "python"), "-c", code], tmp_path)) == {"status": "ok"}


def test_base_install_trains_and_assesses(base_env: Path, tmp_path: Path) -> None:
    qcloop = str(base_env / "qcloop")
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "out"
    _run([qcloop, "phantoms", str(data), "--preset", "tiny", "--workers", "1"], tmp_path)
    cfg = tiny_run_config()  # the install is on trial, not the model: a few steps of each
    cfg = cfg.model_copy(
        update={
            "training": cfg.training.model_copy(update={"min_steps": 20, "epochs": 2}),
            "qc": cfg.qc.model_copy(update={"min_steps": 30, "epochs": 4}),
        }
    )
    config = save_config(cfg, tmp_path / "tiny.yaml")
    train = [qcloop, "train", "--data", str(data), "--out", str(run), "--config", str(config)]
    _run([*train, "--view", "SA"], tmp_path)
    _run([qcloop, "assess", "--data", str(data), "--run", str(run), "--out", str(out)], tmp_path)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert records and all(r["view"] == "SA" and isinstance(r["ood"], bool) for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == len(records) and summary["skipped"] == []


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["serve", "--run", "RUN"], "serve"),
        (["export-onnx", "--run", "RUN"], "onnx"),
        (["models", "list"], "mlflow"),
        (["phantoms-gallery", "OUT"], "report"),
    ],
)
def test_commands_name_their_missing_extra(
    base_env: Path, tmp_path: Path, args: list[str], extra: str
) -> None:
    args = [str(tmp_path / a) if a in ("RUN", "OUT") else a for a in args]
    (tmp_path / "RUN").mkdir()
    env = {**os.environ, "QCLOOP_API_KEY": "k" * 32}
    result = subprocess.run(
        [str(base_env / "qcloop"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"qcloop[{extra}]" in output, output
    assert "Traceback" not in output, output
