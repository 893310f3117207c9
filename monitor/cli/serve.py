"""``qcloop serve``: the HTTP API with QC on every request (see docs/deploy.md)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

log = logging.getLogger(__name__)


@click.command("serve")
@click.option(
    "--run",
    "run_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Serve the models of this trained run folder.",
)
@click.option(
    "--model",
    "model_spec",
    default=None,
    metavar="NAME@ALIAS",
    help="Serve a registered model (e.g. qcloop@champion); reloads when the alias moves.",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to bind (loopback by default; 0.0.0.0 only inside a container).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Configuration file for the serving/monitoring sections (default: the run's config, "
    "else the built-in defaults).",
)
@click.option(
    "--runtime",
    type=click.Choice(["torch", "onnxruntime"]),
    default=None,
    help="Inference backend (default: serving.runtime). onnxruntime needs "
    "`qcloop export-onnx --run RUN` first.",
)
@click.option(
    "--onnx-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="ONNX export to serve with --run (default RUN/onnx).",
)
@click.option(
    "--tracking-uri",
    default=None,
    help="MLflow tracking URI for --model (default: MLFLOW_TRACKING_URI, else ./mlflow.db).",
)
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="Serve without an API key (refused otherwise when QCLOOP_API_KEY and "
    "serving.api_key_file are unset). Never on a shared network.",
)
@click.option(
    "--access-log/--no-access-log", default=False, show_default=True, help="uvicorn access log."
)
def serve(
    run_dir: Path | None,
    model_spec: str | None,
    host: str,
    port: int,
    config_path: Path | None,
    runtime: str | None,
    onnx_dir: Path | None,
    tracking_uri: str | None,
    insecure_no_auth: bool,
    access_log: bool,
) -> None:
    """Serve segmentation with QC over HTTP (POST /v1/segment; API key required).

    The key comes from QCLOOP_API_KEY or the file named by serving.api_key_file; every route
    except /healthz, /readyz and /metrics needs `Authorization: Bearer KEY`.
    """
    from qcloop.monitor.core.config import ConfigError, load_config

    if (run_dir is None) == (model_spec is None):
        raise click.UsageError("give exactly one of --run RUN or --model NAME@ALIAS")
    if onnx_dir is not None and run_dir is None:
        raise click.UsageError("--onnx-dir goes with --run")
    try:
        if config_path is not None:
            cfg = load_config(config_path)
        elif run_dir is not None and (run_dir / "config.yaml").is_file():
            from qcloop.monitor.method.run_folder import load_run_config

            cfg = load_run_config(run_dir)
        else:
            cfg = load_config(None)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if runtime is not None:
        cfg = cfg.model_copy(
            update={"serving": cfg.serving.model_copy(update={"runtime": runtime})}
        )

    from qcloop.deploy.serve import read_api_key

    try:
        api_key = read_api_key(cfg)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if api_key is None and not insecure_no_auth:
        raise click.ClickException(
            "no API key: set QCLOOP_API_KEY or serving.api_key_file "
            "(or pass --insecure-no-auth to serve without one)"
        )
    if api_key is None:
        log.warning(
            "serving WITHOUT authentication (--insecure-no-auth): anyone who can reach %s:%d can use it",
            host,
            port,
        )

    import uvicorn

    from qcloop.deploy.serve import create_app
    from qcloop.deploy.serve_models import RegistrySource, RunSource, SourceError
    from qcloop.plugins.prometheus.exporter import QcMetrics

    # threads per request: the cores shared by the requests processed at once (ONNX Runtime
    # per session; PyTorch process-wide). Oversubscribed threads cost 1.5x throughput here.
    threads = max(1, (os.cpu_count() or 1) // cfg.serving.max_concurrency)
    if cfg.serving.runtime == "torch":
        import torch

        torch.set_num_threads(threads)
    if run_dir is not None:
        source = RunSource(run_dir, onnx_dir=onnx_dir, threads=threads)
    else:
        source = RegistrySource(str(model_spec), tracking_uri, threads=threads)
    log.info("loading %s with runtime %s", source.describe(), cfg.serving.runtime)
    try:
        bundle = source.load(cfg.serving.runtime)
    except SourceError as exc:
        raise click.ClickException(str(exc)) from None
    metrics = QcMetrics(window=cfg.monitoring.window)
    app = create_app(
        source,
        cfg,
        api_key=api_key,
        metrics=metrics,
        initial=bundle,
        allow_no_auth=insecure_no_auth,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # keep qcloop's logging configuration
        access_log=access_log,
        timeout_graceful_shutdown=30,
    )
    uvicorn.Server(config).run()
