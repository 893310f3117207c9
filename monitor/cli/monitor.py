"""``qcloop monitor``: score an inbox of incoming cases, export QC-drift metrics, and refine the
champion models when drift is alerted."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import click

log = logging.getLogger(__name__)


@click.command()
@click.option(
    "--run",
    "run_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Run folder to serve (registered, and made champion where a model has none).",
)
@click.option(
    "--model",
    "model_spec",
    help="Registered models to serve and follow, PREFIX@ALIAS (e.g. qcloop@champion).",
)
@click.option(
    "--inbox",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of incoming NIfTI cases (created if missing).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder: records, ledger, masks, processed/rejected inputs, windows, runs.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML configuration: the sections it sets (monitoring, registry, refinement, ...) "
    "replace those of the run's own configuration.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Port of /metrics (default monitoring.metrics_port; 0: no endpoint).",
)
@click.option(
    "--webhook-port",
    type=click.IntRange(0, 65535),
    help="Serve the Alertmanager webhook on this port (path /alertmanager); needs the secret "
    "in the environment variable named by monitoring.webhook_secret_env.",
)
@click.option("--tracking-uri", help="MLflow tracking URI (default sqlite:///<cwd>/mlflow.db).")
@click.option("--once", is_flag=True, help="Process the files ready now, then exit.")
@click.option(
    "--poll-s", default=2.0, show_default=True, type=click.FloatRange(0.05), help="Inbox poll."
)
@click.option(
    "--settle-s",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.0),
    help="Seconds a file must stay unchanged before it is taken.",
)
@click.option(
    "--cooldown-s",
    default=600.0,
    show_default=True,
    type=click.FloatRange(0.0),
    help="Seconds after an alert before the next alert of the same view.",
)
@click.option(
    "--runtime",
    type=click.Choice(["torch", "onnxruntime"]),
    default="torch",
    show_default=True,
    help="Inference backend (onnxruntime needs RUN/onnx from qcloop export-onnx).",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    help="CPU threads of PyTorch (default: its own choice); 1 is faster when other busy "
    "processes share the cores.",
)
def monitor(
    run_dir: Path | None,
    model_spec: str | None,
    inbox: Path,
    out_dir: Path,
    config_file: Path | None,
    metrics_port: int | None,
    webhook_port: int | None,
    tracking_uri: str | None,
    once: bool,
    poll_s: float,
    settle_s: float,
    cooldown_s: float,
    runtime: str,
    threads: int | None,
) -> None:
    """Watch INBOX, score each case with the champion models, write masks and QC records to
    OUT, export Prometheus metrics, and refine on drift alerts (own policy or Alertmanager).

    Restartable: finished cases (by content hash, in OUT/ledger.jsonl) are never scored again.
    """
    from qcloop.monitor.core.config import QcloopConfig, load_config
    from qcloop.monitor.method.run_folder import load_run_config
    from qcloop.monitor.ops.monitor import MlflowModelRegistry, Monitor
    from qcloop.monitor.ops.webhook import AlertmanagerWebhook, webhook_secret

    if (run_dir is None) == (model_spec is None):
        raise click.UsageError("give exactly one of --run RUN or --model PREFIX@ALIAS")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    file_cfg = load_config(config_file) if config_file else None
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = out_dir.resolve() / "models"

    def merged(run: Path) -> QcloopConfig:
        """The run's configuration with the sections the --config file sets."""
        cfg = load_run_config(run)
        if file_cfg is None:
            return cfg
        return cfg.model_copy(update={k: getattr(file_cfg, k) for k in file_cfg.model_fields_set})

    if run_dir is not None:
        cfg = merged(run_dir)
        registry, champions = MlflowModelRegistry.for_run(
            run_dir, cfg, tracking_uri=tracking_uri, cache_dir=cache_dir
        )
    else:
        assert model_spec is not None
        probe = MlflowModelRegistry(
            model_spec,
            file_cfg or load_config(None),
            tracking_uri=tracking_uri,
            cache_dir=cache_dir,
        )
        champions = probe.champions()
        cfg = merged(next(iter(champions.values())).run_dir)
        registry = MlflowModelRegistry(
            model_spec, cfg, tracking_uri=tracking_uri, cache_dir=cache_dir
        )
    refinement = None
    if file_cfg is not None and "refinement" in file_cfg.model_fields_set:
        refinement = file_cfg.refinement
    mon = Monitor(
        inbox,
        out_dir,
        cfg,
        champions,
        registry=registry,
        runtime=runtime,
        refinement=refinement,
        settle_s=settle_s,
        cooldown_s=cooldown_s,
        reload_poll_s=cfg.serving.reload_poll_s,
    )
    servers = []
    try:
        port = cfg.monitoring.metrics_port if metrics_port is None else metrics_port
        if port:
            server = mon.metrics.serve(cfg.monitoring.metrics_host, port)
            servers.append(server)
            click.echo(f"metrics: http://{server.host}:{server.port}/metrics", err=True)
        if webhook_port is not None:
            secret = webhook_secret(cfg.monitoring.webhook_secret_env)
            hook = AlertmanagerWebhook(mon.receive_alert, secret, "127.0.0.1", webhook_port)
            servers.append(hook.start())
            click.echo(f"alertmanager webhook: {hook.url}", err=True)
        for view, state in sorted(mon.views.items()):
            ref = state.reference_median
            click.echo(
                f"{view}: {state.champion.name} version {state.champion.version} "
                f"({state.champion.run_dir}), reference median pDC "
                + (f"{ref:.4f}" if ref is not None else "unknown"),
                err=True,
            )
        click.echo(f"watching {inbox} -> {out_dir}", err=True)

        def _stop(signum: int, _frame: object) -> None:
            log.info("signal %d: stopping after the case in progress", signum)
            mon.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        mon.run(poll_s, once=once)
    finally:
        for server in reversed(servers):
            server.close()
        mon.close()
    click.echo(f"records: {out_dir / 'records.jsonl'}; ledger: {out_dir / 'ledger.jsonl'}")
