"""``qcloop serve``: a real uvicorn server on 127.0.0.1 and a real HTTP client (httpx)."""

from __future__ import annotations

import base64
import gzip
import json
import math
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest
import yaml

from qcloop.deploy.serve.app import create_app
from qcloop.deploy.serve.auth import read_api_key
from qcloop.deploy.serve.mask_store import MaskStore
from qcloop.deploy.serve.model_source import (
    ModelBundle,
    RegistrySource,
    RunSource,
    SourceError,
    bundle_from_scorers,
)
from qcloop.monitor import hookimpl
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.interfaces import ModelRef
from qcloop.monitor.method.run_folder import load_run_config

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
STRUCTURES = ("LV", "MYO", "RV")


# --------------------------------------------------------------------------- a live server


class LiveServer:
    """uvicorn serving ``app`` on a free 127.0.0.1 port in a thread; ``stop()`` shuts it down."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", log_config=None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


def serve_cfg(run: Path, **serving: Any) -> QcloopConfig:
    cfg = load_run_config(run)
    settings = {"runtime": "torch", "max_upload_mb": 2.0, **serving}
    return cfg.model_copy(update={"serving": cfg.serving.model_copy(update=settings)})


@pytest.fixture(scope="module")
def live(tiny_run: Path) -> Iterator[LiveServer]:
    """The tiny run served with runtime torch, a 2 MB upload limit and the test key."""
    source = RunSource(tiny_run)
    cfg = serve_cfg(tiny_run)
    app = create_app(source, cfg, api_key=KEY, initial=source.load("torch"))
    server = LiveServer(app)
    yield server
    server.stop()


def cohort_file(cohort: Path, view: str, phase: str = "ED") -> Path:
    return next(cohort.glob(f"*/*_{view}_{phase}.nii.gz"))


def nifti_gz(data: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    return gzip.compress(image.to_bytes())


def finite(obj: Any) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite(v) for v in obj)
    return True


def metric_total(text: str, name: str) -> float:
    return sum(
        float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    )


def post(client: httpx.Client, payload: bytes, filename: str, **fields: str) -> httpx.Response:
    return client.post(
        "/v1/segment", headers=AUTH, files={"file": (filename, payload)}, data=fields or None
    )


def check_segmentation(body: dict[str, Any], upload: Path) -> np.ndarray:
    """The mask decodes to uint8 labels 0..3 on the upload's grid; the record is complete."""
    original = nib.load(upload)
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(body["mask"]["base64"])))
    labels = np.asarray(mask.dataobj)
    assert labels.shape == original.shape
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    np.testing.assert_allclose(mask.affine, original.affine, atol=1e-5)
    rec = body["record"]
    assert rec["candidates"] and all(
        set(c) == set(STRUCTURES) and all({"pdc", "phd_mm"} <= set(c[s]) for s in STRUCTURES)
        for c in rec["candidates"]
    )
    assert {"pdc_low", "phd_high"} <= set(rec["fences"])
    assert isinstance(rec["ood"], bool) and rec["selection"]["kind"]
    assert rec["model"]["version"] and rec["runtime"]["providers"]
    assert rec["latency_s"] > 0 and rec["request"]["latency_s"] >= rec["latency_s"]
    assert rec["image"] == upload.name
    assert finite(rec)
    return labels


# --------------------------------------------------------------------------- endpoints


@pytest.fixture(scope="module")
def onnx_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run with an ONNX export (skips without the onnx extra)."""
    pytest.importorskip("onnxruntime")
    from qcloop.deploy.onnx.export import export_run

    run = tmp_path_factory.mktemp("onnx-run") / "run"
    shutil.copytree(tiny_run, run)
    export_run(run, run / "onnx", max_cases=1, exporter="torchscript")
    return run


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_segments_sa_and_la_volumes(
    runtime: str, request: pytest.FixtureRequest, tiny_cohort: Path
) -> None:
    if runtime == "torch":
        server = request.getfixturevalue("live")
        owned = None
    else:
        run = request.getfixturevalue("onnx_run")
        source = RunSource(run)
        cfg = serve_cfg(run, runtime="onnxruntime")
        server = owned = LiveServer(
            create_app(source, cfg, api_key=KEY, initial=source.load("onnxruntime"))
        )
    try:
        with server.client() as client:
            before = metric_total(client.get("/metrics").text, "qcloop_cases_scored_total")
            for view in ("SA", "LA"):
                path = cohort_file(tiny_cohort, view)
                response = post(client, path.read_bytes(), path.name)
                assert response.status_code == 200, response.text
                body = response.json()
                check_segmentation(body, path)
                assert body["record"]["view"] == view and body["record"]["phase"] == "ED"
                assert body["record"]["runtime"]["name"] == runtime
            after = metric_total(client.get("/metrics").text, "qcloop_cases_scored_total")
            assert after >= before + 2
            models = client.get("/v1/models", headers=AUTH).json()
            assert models["ready"] and set(models["views"]) == {"SA", "LA"}
            for info in models["views"].values():
                assert info["runtime"] == runtime and info["providers"]
                if runtime == "onnxruntime":
                    assert any("ExecutionProvider" in p for p in info["providers"])
    finally:
        if owned is not None:
            owned.stop()


def test_view_from_form_field_and_one_time_mask_link(live: LiveServer, tiny_cohort: Path) -> None:
    path = cohort_file(tiny_cohort, "SA", "ES")
    with live.client() as client:
        response = client.post(
            "/v1/segment",
            params={"mask": "link", "figure": "1"},
            headers=AUTH,
            files={"file": ("scan.nii.gz", path.read_bytes())},
            data={"view": "SA", "phase": "ES"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["record"]["view"] == "SA" and body["record"]["phase"] == "ES"
        # ?figure=1: the case's QC figure, a PNG, inline
        assert body["figure"]["media_type"] == "image/png"
        assert base64.b64decode(body["figure"]["base64"])[:8] == b"\x89PNG\r\n\x1a\n"
        url = body["mask"]["url"]
        assert body["mask"]["kind"] == "link" and body["mask"]["expires_in_s"] > 0
        assert client.get(url).status_code == 401  # the link needs the key too
        fetched = client.get(url, headers=AUTH)
        assert fetched.status_code == 200
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(fetched.content))
        assert mask.shape == nib.load(path).shape
        again = client.get(url, headers=AUTH)
        assert again.status_code == 404 and "fetched once" in again.json()["detail"]


def test_auth_on_every_route_but_health_readiness_and_metrics(live: LiveServer) -> None:
    with live.client() as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path).status_code == 200, path
        assert client.get("/readyz").json() == {"ready": True, "reason": None}
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/segment")):
            missing = client.request(method, path)
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = client.request(method, path, headers={"Authorization": "Bearer nope" * 3})
            assert wrong.status_code == 403 and wrong.json()["detail"] == "invalid API key"
            basic = client.request(method, path, headers={"Authorization": f"Basic {KEY}"})
            assert basic.status_code == 401
        metrics = client.get("/metrics").text
        assert 'qcloop_http_requests_total{endpoint="/v1/models",method="GET",status="403"}' in (
            metrics
        )


def _header_only(shape: tuple[int, ...]) -> bytes:
    """A gzipped NIfTI-1 header claiming ``shape`` float32 voxels, with almost no data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 4096)


def _hostile_uploads(cohort: Path) -> list[tuple[str, bytes, str, dict[str, str], int, str]]:
    good = cohort_file(cohort, "SA").read_bytes()
    nan = np.ones((32, 32, 4), np.float32)
    nan[3, 4, 1] = np.nan
    return [
        ("truncated gzip", good[: len(good) // 2], "t_SA_ED.nii.gz", {}, 422, "truncated"),
        ("2D", nifti_gz(np.ones((32, 32), np.float32)), "a_SA.nii.gz", {}, 422, "dimensionality"),
        ("5D", nifti_gz(np.ones((8, 8, 2, 2, 2), np.float32)), "a_SA.nii.gz", {}, 422, "5D"),
        ("20000^2 header", _header_only((20000, 20000, 1)), "a_SA.nii.gz", {}, 413, "20000"),
        ("NaN voxels", nifti_gz(nan), "a_SA.nii.gz", {}, 422, "NaN"),
        ("not NIfTI", b"%PDF-1.7 not an image" * 50, "a_SA.nii", {}, 415, "not a NIfTI"),
        ("gzip not NIfTI", gzip.compress(b"hello" * 200), "a_SA.nii.gz", {}, 415, "not a NIfTI"),
        ("ambiguous name", good, "scan.nii.gz", {}, 422, "does not tell the view"),
        ("both views named", good, "x_SA_LA.nii.gz", {}, 422, "does not tell the view"),
        ("contradicting view", good, "a_SA_ED.nii.gz", {"view": "LA"}, 422, "says SA"),
        ("bad view field", good, "scan.nii.gz", {"view": "AX"}, 422, "expected SA or LA"),
        ("bad phase field", good, "a_SA.nii.gz", {"phase": "../../x"}, 422, "phase"),
        ("huge spacing", nifti_gz(np.ones((64, 64, 2), np.float32), np.diag([500, 500, 8, 1])),
         "a_SA.nii.gz", {}, 413, "field of view"),
    ]  # fmt: skip


def test_corrupt_and_hostile_uploads_get_the_right_4xx(live: LiveServer, tiny_cohort: Path) -> None:
    good = cohort_file(tiny_cohort, "SA")
    with live.client() as client:
        for label, payload, filename, fields, status, reason in _hostile_uploads(tiny_cohort):
            response = post(client, payload, filename, **fields)
            assert response.status_code == status, (label, response.text)
            assert reason in response.json()["detail"], (label, response.text)
        # malformed requests
        no_file = client.post("/v1/segment", headers=AUTH, files={"view": (None, "SA")})
        assert no_file.status_code == 400 and "'file'" in no_file.json()["detail"]
        text_file = client.post("/v1/segment", headers=AUTH, files={"file": (None, "SA")})
        assert text_file.status_code == 400
        broken = client.post(
            "/v1/segment",
            headers={**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"},
            content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n',
        )
        assert broken.status_code == 400, broken.text
        json_body = client.post("/v1/segment", headers=AUTH, json={"file": "x"})
        assert json_body.status_code == 415
        # over the 2 MB limit: with Content-Length, and streamed (chunked, no length)
        big = np.random.default_rng(0).bytes(3 * 1024 * 1024)
        too_big = post(client, big, "a_SA.nii")
        assert too_big.status_code == 413 and "2 MB" in too_big.json()["detail"]

        def chunks() -> Iterator[bytes]:
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a_SA.nii"\r\n\r\n'
            for _ in range(48):
                yield b"\0" * 65536

        streamed = client.post(
            "/v1/segment",
            headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"},
            content=chunks(),
        )
        assert streamed.status_code == 413
        # the server still serves a good request
        response = post(client, good.read_bytes(), good.name)
        assert response.status_code == 200, response.text
        check_segmentation(response.json(), good)
        errors = metric_total(client.get("/metrics").text, "qcloop_case_errors_total")
        assert errors >= 5


# --------------------------------------------------------------------------- load and reload


class HeldScorer:
    """Wraps a real scorer; ``score`` waits until ``gate`` is set (a worker held busy)."""

    def __init__(self, scorer: Any, gate: threading.Event, started: threading.Event) -> None:
        self._scorer = scorer
        self.gate = gate
        self.started = started
        self.runtime = scorer.runtime
        self.model_info = scorer.model_info
        self.preprocessor = scorer.preprocessor

    def score(self, case: Any) -> Any:
        self.started.set()
        assert self.gate.wait(60), "test never released the worker"
        return self._scorer.score(case)


class HeldSource:
    """A static source whose scorers are held busy until the test releases them."""

    dynamic = False

    def __init__(self, run: Path) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self._run = run

    def describe(self) -> str:
        return "held"

    def fingerprint(self) -> str:
        return "held"

    def load(self, runtime: str) -> ModelBundle:
        real = RunSource(self._run).load(runtime)
        held = {v: HeldScorer(s, self.gate, self.started) for v, s in real.scorers.items()}
        return bundle_from_scorers(held, "held", runtime)


def test_full_queue_answers_429_with_retry_after(tiny_run: Path, tiny_cohort: Path) -> None:
    source = HeldSource(tiny_run)
    cfg = serve_cfg(tiny_run, max_concurrency=1, queue_size=0)
    server = LiveServer(create_app(source, cfg, api_key=KEY, initial=source.load("torch")))
    path = cohort_file(tiny_cohort, "SA")
    try:
        with server.client() as client, ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, client, path.read_bytes(), path.name)
            assert source.started.wait(30)
            metrics = client.get("/metrics").text
            assert metric_total(metrics, "qcloop_http_in_flight") == 1
            t0 = time.perf_counter()
            refused = post(client, path.read_bytes(), path.name)
            assert time.perf_counter() - t0 < 5  # at once, not after the held request
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert client.get("/healthz").status_code == 200  # the event loop is free
            source.gate.set()
            assert first.result(timeout=60).status_code == 200
            assert metric_total(client.get("/metrics").text, "qcloop_http_rejected_total") == 1
    finally:
        source.gate.set()
        server.stop()


def test_registry_alias_move_reloads_without_failing_a_request(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    """Two run folders behind ``qcloop@champion``: moving the alias while requests run swaps
    the models; every request succeeds and the versions reported change."""
    runs = {}
    for version in ("1", "2"):
        runs[version] = tmp_path / f"v{version}"
        shutil.copytree(tiny_run, runs[version])
    champion = {"version": "1"}

    class Registry:
        """The two calls of the ``ModelRegistry`` protocol that serving uses."""

        def alias_versions(self, spec: str) -> dict[str, str]:
            assert spec == "qcloop@champion"
            return {"SA": champion["version"], "LA": champion["version"]}

        def resolve(self, spec: str) -> dict[str, ModelRef]:
            v = champion["version"]
            return {
                view: ModelRef(f"qcloop-{view}", view, v, runs[v], aliases=["champion"])
                for view in ("SA", "LA")
            }

    source = RegistrySource("qcloop@champion", registry=Registry())
    cfg = serve_cfg(tiny_run, reload_poll_s=0.2, max_concurrency=2, queue_size=16)
    server = LiveServer(create_app(source, cfg, api_key=KEY))  # loads in the background
    path = cohort_file(tiny_cohort, "LA")
    payload = path.read_bytes()
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        with server.client() as client:
            while not stop.is_set():
                response = post(client, payload, path.name)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                else:
                    seen.append(response.json()["record"]["model"]["version"])

    def wait_for(version: str) -> None:
        deadline = time.monotonic() + 60
        with server.client() as client:
            while time.monotonic() < deadline:
                models = client.get("/v1/models", headers=AUTH).json()
                versions = {v["model"]["version"] for v in models["views"].values()}
                if versions == {version}:
                    return
                time.sleep(0.1)
        raise AssertionError(f"never switched to version {version}")

    try:
        wait_for("1")
        with server.client() as client:
            assert client.get("/readyz").status_code == 200
        workers = [threading.Thread(target=hammer) for _ in range(3)]
        for w in workers:
            w.start()
        for version in ("2", "1", "2"):
            time.sleep(0.5)
            champion["version"] = version
            wait_for(version)
        time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join(timeout=60)
        with server.client() as client:
            models = client.get("/v1/models", headers=AUTH).json()
            metrics = client.get("/metrics").text
    finally:
        stop.set()
        server.stop()
    assert failures == []
    assert {"1", "2"} <= set(seen)
    assert models["reloads"] == 3 and models["reload_failures"] == 0
    assert json.loads(models["fingerprint"]) == {"SA": "2", "LA": "2"}
    assert metric_total(metrics, "qcloop_model_reloads_total") == 3


def test_registry_source_builds_the_configured_registry_backend(
    plugin_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``--model`` reaches the registry only through the ``ModelRegistry`` protocol, built by
    name from ``registry.backend`` with the URI and cache folder given."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    built: list[dict[str, Any]] = []

    class Registry:
        def alias_versions(self, spec: str) -> dict[str, str]:
            return {"SA": "4", "LA": "2"}

    class Backend:
        @hookimpl
        def register_model_registries(self, register: Any) -> None:
            def factory(uri: str | None = None, cache_dir: Path | None = None) -> Registry:
                built.append({"uri": uri, "cache_dir": cache_dir})
                return Registry()

            register("test-backend", factory)

    get_plugin_manager().register(Backend(), name="test-backend-plugin")
    cfg = QcloopConfig.model_validate({"registry": {"backend": {"name": "test-backend"}}})
    source = RegistrySource("qcloop@champion", "test://store", cfg=cfg, cache_dir=tmp_path)
    assert json.loads(source.fingerprint()) == {"SA": "4", "LA": "2"}
    assert source.fingerprint() == source.fingerprint()
    assert built == [{"uri": "test://store", "cache_dir": tmp_path}]  # built once, then kept
    unknown = QcloopConfig.model_validate({"registry": {"backend": {"name": "nope"}}})
    with pytest.raises(SourceError, match="unknown model registry 'nope'"):
        RegistrySource("qcloop@champion", cfg=unknown).fingerprint()


def test_not_ready_until_models_load_and_a_failed_load_is_reported(tiny_run: Path) -> None:
    cfg = serve_cfg(tiny_run, reload_poll_s=30)
    server = LiveServer(create_app(RunSource(tiny_run / "missing"), cfg, api_key=KEY))
    try:
        with server.client() as client:
            deadline = time.monotonic() + 30
            while client.get("/v1/models", headers=AUTH).json()["reload_failures"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["ready"] is False
            assert client.get("/healthz").status_code == 200
            busy = client.post("/v1/segment", headers=AUTH, files={"file": ("a_SA.nii", b"x")})
            assert busy.status_code == 503 and "retry-after" in busy.headers
            models = client.get("/v1/models", headers=AUTH).json()
            assert "not a qcloop run folder" in models["last_reload_error"]
            failed = 'qcloop_model_reloads_total{outcome="failed"}'
            assert failed in client.get("/metrics").text
    finally:
        server.stop()


# --------------------------------------------------------------------------- pieces


def test_sources_refuse_clearly(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"qcloop export-onnx --run"):
        RunSource(tiny_run, onnx_dir=tmp_path / "none").load("onnxruntime")
    with pytest.raises(SourceError, match="not a qcloop run folder"):
        RunSource(tmp_path).load("torch")
    with pytest.raises(SourceError, match="unknown runtime"):
        RunSource(tiny_run).load("tensorflow")
    with pytest.raises(ValueError, match="API key is required"):
        create_app(RunSource(tiny_run), QcloopConfig(), api_key=None)


def test_api_key_sources_and_length(tmp_path: Path) -> None:
    cfg = QcloopConfig()
    assert read_api_key(cfg, {}) is None
    assert read_api_key(cfg, {"QCLOOP_API_KEY": f" {KEY}\n"}) == KEY
    with pytest.raises(ValueError, match="at least 16"):
        read_api_key(cfg, {"QCLOOP_API_KEY": "short"})
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    file_cfg = QcloopConfig.model_validate({"serving": {"api_key_file": str(key_file)}})
    assert read_api_key(file_cfg, {}) == KEY
    missing = QcloopConfig.model_validate({"serving": {"api_key_file": str(tmp_path / "no")}})
    with pytest.raises(ValueError, match="cannot read the API key file"):
        read_api_key(missing, {})


def test_cli_refuses_without_a_key_or_with_two_sources(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from qcloop.monitor.cli.main import cli

    monkeypatch.delenv("QCLOOP_API_KEY", raising=False)
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", "--run", str(tiny_run), "--runtime", "torch"])
    assert result.exit_code != 0 and "no API key" in result.output
    assert "--insecure-no-auth" in result.output
    both = runner.invoke(cli, ["serve", "--run", str(tiny_run), "--model", "qcloop@champion"])
    assert both.exit_code != 0 and "exactly one of --run" in both.output
    monkeypatch.setenv("QCLOOP_API_KEY", KEY)
    no_export = runner.invoke(
        cli, ["serve", "--run", str(tiny_run), "--runtime", "onnxruntime", "--onnx-dir", "/nope"]
    )
    assert no_export.exit_code != 0 and "qcloop export-onnx --run" in no_export.output


def test_cli_names_registered_runtimes_and_the_missing_extra(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from click.testing import CliRunner

    from qcloop.monitor.cli.main import cli

    monkeypatch.setenv("QCLOOP_API_KEY", KEY)
    runner = CliRunner()
    unknown = runner.invoke(cli, ["serve", "--run", str(tiny_run), "--runtime", "tensorflow"])
    assert unknown.exit_code != 0 and "unknown runtime 'tensorflow'" in unknown.output
    assert "onnxruntime" in unknown.output and "torch" in unknown.output
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were missing
    missing = runner.invoke(cli, ["serve", "--run", str(tiny_run)])
    assert missing.exit_code != 0
    assert "qcloop serve needs the 'serve' extra" in missing.output
    assert "pip install 'qcloop[serve]'" in missing.output


class EventRecorder:
    """A plugin that records what a service tells plugins."""

    def __init__(self) -> None:
        self.services: list[tuple[str, str, str, bool]] = []
        self.events: list[Any] = []

    @hookimpl
    def on_service_started(self, service: Any) -> None:
        self.services.append(("started", service.id, service.kind, service.app is not None))

    @hookimpl
    def on_service_stopped(self, service: Any) -> None:
        self.services.append(("stopped", service.id, service.kind, service.app is not None))

    @hookimpl
    def on_case_scored(self, event: Any) -> None:
        self.events.append(event)

    @hookimpl
    def on_case_failed(self, event: Any) -> None:
        self.events.append(event)

    @hookimpl
    def on_window_changed(self, event: Any) -> None:
        self.events.append(event)

    @hookimpl
    def on_models_loaded(self, event: Any) -> None:
        self.events.append(event)

    @hookimpl
    def on_admission_changed(self, event: Any) -> None:
        self.events.append(event)


def test_exporter_blocked_serve_still_answers_and_plugins_hear_every_event(
    tiny_run: Path, tiny_cohort: Path
) -> None:
    """With the Prometheus exporter blocked there is no /metrics, the API works, and another
    plugin receives the service's start and stop and every event it emits, with its id."""
    from qcloop.monitor.core.plugin_manager import make_plugin_manager

    pm = make_plugin_manager(load_entrypoints=False)
    pm.set_blocked("qcloop.plugins.prometheus.exporter")
    recorder = EventRecorder()
    pm.register(recorder, name="event-recorder")
    source = RunSource(tiny_run)
    app = create_app(
        source, serve_cfg(tiny_run), api_key=KEY, initial=source.load("torch"), plugin_manager=pm
    )
    good = cohort_file(tiny_cohort, "SA")
    server = LiveServer(app)
    try:
        with server.client() as client:
            assert client.get("/metrics").status_code == 404
            assert post(client, good.read_bytes(), good.name).status_code == 200
            assert post(client, b"%PDF-1.7" * 100, "a_SA.nii").status_code == 415
            nan = np.ones((32, 32, 4), np.float32)
            nan[1, 2, 3] = np.nan
            assert post(client, nifti_gz(nan), "a_SA.nii.gz").status_code == 422
    finally:
        server.stop()
    (_, service_id, kind, has_app), stopped = recorder.services
    assert kind == "serve" and has_app and stopped[:3] == ("stopped", service_id, "serve")
    events = recorder.events
    assert events and all(e.service == service_id for e in events)
    by_kind: dict[str, list[Any]] = {}
    for event in events:
        by_kind.setdefault(event.kind, []).append(event)
    (loaded,) = by_kind["models_loaded"]
    assert loaded.outcome == "ok" and not loaded.reload and set(loaded.views) == {"SA", "LA"}
    assert all(v["runtime"] == "torch" and v["providers"] for v in loaded.views.values())
    windows = by_kind["window_changed"]
    assert [(w.view, w.cause) for w in windows[:2]] == [("LA", "reset"), ("SA", "reset")]
    assert [(w.view, w.cause, w.stats.n) for w in windows[2:]] == [("SA", "case", 1)]
    (scored,) = by_kind["case_scored"]
    assert scored.view == "SA" and scored.record["image"] == good.name
    failed = by_kind["case_failed"]
    assert [(f.stage, f.source, f.view) for f in failed] == [
        ("validate", "upload", "SA"),
        ("read", "upload", "SA"),
    ]
    assert "not a NIfTI" in failed[0].reason and "NaN" in failed[1].reason
    admission = by_kind["admission_changed"]
    assert max(a.running for a in admission) == 1 and not any(a.rejected for a in admission)
    assert (admission[-1].running, admission[-1].waiting) == (0, 0)


def test_mask_store_is_bounded_and_expires() -> None:
    store = MaskStore(max_entries=2, max_bytes=10, ttl_s=60)
    a, b = store.put(b"aaaa"), store.put(b"bbbb")
    c = store.put(b"cccc")  # evicts a (count)
    assert store.take(a) is None and store.take(b) == b"bbbb" and store.take(b) is None
    d = store.put(b"dddddddd")  # evicts c (bytes)
    assert store.take(c) is None and store.take(d) == b"dddddddd"
    short = MaskStore(ttl_s=0.01)
    token = short.put(b"x")
    time.sleep(0.05)
    assert short.take(token) is None and len(short) == 0


# --------------------------------------------------------------------------- deployment assets


def _app_routes() -> set[str]:
    app = create_app(
        RunSource("unused"),
        QcloopConfig(),
        api_key=KEY,
        initial=ModelBundle(scorers={}, fingerprint="-", runtime="torch"),
    )
    return {getattr(r, "path", "") for r in app.routes}


def test_kubernetes_manifests_and_dockerfile_match_the_app() -> None:
    docs: list[dict[str, Any]] = []
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service", "ServiceMonitor"} <= set(by_kind)
    assert by_kind["ServiceMonitor"]["apiVersion"] == "monitoring.coreos.com/v1"
    routes = _app_routes()
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and pod["tolerations"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
    key_env = next(e for e in container["env"] if e["name"] == "QCLOOP_API_KEY")
    assert key_env["valueFrom"]["secretKeyRef"]["name"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service_ports = {p["name"]: p for p in by_kind["Service"]["spec"]["ports"]}
    endpoint = by_kind["ServiceMonitor"]["spec"]["endpoints"][0]
    assert endpoint["port"] in service_ports
    assert endpoint["path"] in routes
    assert service_ports[endpoint["port"]]["targetPort"] in container_ports
    selector = by_kind["Service"]["spec"]["selector"]
    labels = by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    monitor_labels = by_kind["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    assert monitor_labels.items() <= by_kind["Service"]["metadata"]["labels"].items()

    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])", dockerfile, re.M)
    cmd = re.search(r"^CMD\s+(\[.*\])", dockerfile, re.M)
    assert entry and cmd
    argv = json.loads(entry.group(1)) + json.loads(cmd.group(1))
    assert argv[:2] == ["qcloop", "serve"]
    from qcloop.deploy.commands.serve import serve

    options = {opt for p in serve.params for opt in p.opts}
    for args in (argv[2:], container["args"]):
        given = [a.split("=")[0] for a in args if a.startswith("--")]
        assert given and set(given) <= options, set(given) - options
    assert re.search(r"^USER\s+(?!root|0\b)\S+", dockerfile, re.M)
    health = re.search(r"^HEALTHCHECK .*", dockerfile, re.M | re.S)
    assert health and "/healthz" in health.group(0)
    assert "onnxruntime-gpu" in dockerfile and re.search(r"^FROM\s+nvidia/cuda:", dockerfile, re.M)
    port = container_ports[container["ports"][0]["name"]]
    assert f"--port={port}" in argv or ["--port", str(port)] == argv[argv.index("--port") :][:2]


@pytest.mark.slow
def test_bench_serve_runs_the_cli_server_in_a_subprocess(tiny_run: Path) -> None:
    """`qcloop bench serve` starts `qcloop serve` as a user would and reports every figure."""
    from click.testing import CliRunner

    from qcloop.deploy.benchmarks.serve import phantom_sa_volume
    from qcloop.monitor.cli.main import cli

    payload, shape = phantom_sa_volume(slices=10)
    image = nib.Nifti1Image.from_bytes(gzip.decompress(payload))
    assert image.shape == shape and shape[2] == 10
    result = CliRunner().invoke(
        cli,
        ["bench", "serve", "--run", str(tiny_run), "--runtime", "torch", "--requests", "3",
         "--concurrency", "1,2", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output[result.output.index("{") :])
    assert [lv["concurrency"] for lv in figures["levels"]] == [1, 2]
    for lv in figures["levels"]:
        assert lv["requests"] == 3 and lv["errors"] == 0 and lv["ok"] == 3
        assert 0 < lv["p50_ms"] <= lv["p99_ms"] and lv["throughput_rps"] > 0
    assert figures["server"]["peak_rss_mb"] >= figures["server"]["rss_mb"] > 50
    assert figures["providers"]["SA"] == ["torch:cpu"]


def test_header_check_refuses_a_huge_header_without_allocating() -> None:
    import io
    import tracemalloc

    from qcloop.deploy.serve.upload import UploadLimits, UploadProblem, inspect_upload

    payload = _header_only((20000, 20000, 1))  # 1.6 GB of float32 voxels if it were read
    tracemalloc.start()
    try:
        with pytest.raises(UploadProblem) as refused:
            inspect_upload(io.BytesIO(payload), UploadLimits(max_inplane=1024, max_slices=64))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.status == 413 and "20000 x 20000" in refused.value.reason
    assert peak < 2_000_000


def test_view_and_phase_from_file_names() -> None:
    from qcloop.deploy.serve.upload import names_from_filename

    assert names_from_filename("001_SA_ED.nii.gz") == ("SA", "ED")
    assert names_from_filename("C:\\scans\\p7-lax-es.nii") == ("LA", "ES")
    assert names_from_filename("../../etc/001_LA.nii.gz") == ("LA", None)
    assert names_from_filename("scan.nii.gz") == (None, None)
    assert names_from_filename("x_SA_LA_ED_ES.nii") == (None, None)
    assert names_from_filename(None) == (None, None)
