"""``qcloop serve``: the HTTP API with QC on every request (see docs/deploy.md)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import click

from qcloop.monitor.cli.extras import need

log = logging.getLogger(__name__)

__all__ = ["registered_runtime", "serve"]


def registered_runtime(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """A click callback: ``value`` must name a registered runtime (``None`` passes)."""
    if value is None:
        return None
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    runtimes = get_plugin_manager().runtimes()
    if value not in runtimes:
        raise click.BadParameter(runtimes.unknown_message(value))
    return value


def _serve_config(config_path: Path | None, run_dir: Path | None, runtime: str | None) -> Any:
    """``--config``, else the run's configuration, else the defaults; ``--runtime`` applied."""
    from qcloop.monitor.core.config import ConfigError, load_config

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
    return cfg


def _api_key(cfg: Any, insecure_no_auth: bool, host: str, port: int) -> str | None:
    """The API key, or ``None`` with a warning when serving without one was asked for."""
    from qcloop.deploy.serve.auth import read_api_key

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
    return api_key


def _worker_threads(cfg: Any) -> int:
    """Threads per request: the cores shared by the requests processed at once (ONNX Runtime
    per session; PyTorch process-wide). Oversubscribed threads cost 1.5x throughput here."""
    threads = max(1, (os.cpu_count() or 1) // cfg.serving.max_concurrency)
    if cfg.serving.runtime == "torch":  # torch's thread count is per process, not per session
        import torch

        torch.set_num_threads(threads)
    return threads


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
    default=None,
    metavar="NAME",
    callback=registered_runtime,
    help="Registered inference runtime (default: serving.runtime): torch, onnxruntime (needs "
    "`qcloop export-onnx --run RUN` first) or one a plugin adds.",
)
@click.option(
    "--onnx-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="ONNX export to serve with --run and the onnxruntime runtime (default RUN/onnx).",
)
@click.option(
    "--tracking-uri",
    default=None,
    help="Model registry URI for --model (default: registry.uri, else MLFLOW_TRACKING_URI, "
    "else ./mlflow.db).",
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
    except /healthz, /readyz and /metrics needs `Authorization: Bearer KEY`. /metrics is
    served while a metrics exporter plugin (Prometheus, built in) is active.
    """
    need("qcloop serve", "serve", "fastapi", "uvicorn")
    if (run_dir is None) == (model_spec is None):
        raise click.UsageError("give exactly one of --run RUN or --model NAME@ALIAS")
    if onnx_dir is not None and run_dir is None:
        raise click.UsageError("--onnx-dir goes with --run")
    from qcloop.monitor.core.plugin_manager import apply_plugin_settings

    cfg = _serve_config(config_path, run_dir, runtime)
    apply_plugin_settings(cfg)
    api_key = _api_key(cfg, insecure_no_auth, host, port)
    app = _app(cfg, api_key, insecure_no_auth, run_dir, model_spec, onnx_dir, tracking_uri)
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # keep qcloop's logging configuration
        access_log=access_log,
        timeout_graceful_shutdown=30,
    )
    uvicorn.Server(config).run()


def _app(
    cfg: Any,
    api_key: str | None,
    insecure_no_auth: bool,
    run_dir: Path | None,
    model_spec: str | None,
    onnx_dir: Path | None,
    tracking_uri: str | None,
) -> Any:
    """The app, with its models loaded from the run folder or the registry before it starts."""
    from qcloop.deploy.serve.app import create_app
    from qcloop.deploy.serve.model_source import RegistrySource, RunSource, SourceError

    threads = _worker_threads(cfg)
    if run_dir is not None:
        source: Any = RunSource(run_dir, onnx_dir=onnx_dir, threads=threads)
    else:
        source = RegistrySource(str(model_spec), tracking_uri, cfg=cfg, threads=threads)
    log.info("loading %s with runtime %s", source.describe(), cfg.serving.runtime)
    try:
        bundle = source.load(cfg.serving.runtime)
    except SourceError as exc:
        raise click.ClickException(str(exc)) from None
    app = create_app(source, cfg, api_key=api_key, initial=bundle, allow_no_auth=insecure_no_auth)
    for name, url in app.state.service_info.endpoints.items():
        log.info("%s: %s", name, url)
    return app
