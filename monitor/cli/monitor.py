"""``qcloop monitor``: score an inbox of incoming cases, tell plugins what happens (the
Prometheus exporter serves QC-drift metrics), and refine the champion models when drift is
alerted."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import click

from qcloop.monitor.core.config import QcloopConfig, load_config
from qcloop.monitor.ops.webhook import WebhookError, webhook_secret

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.interfaces import ModelRef, ModelRegistry
    from qcloop.monitor.ops.monitor import Monitor

log = logging.getLogger(__name__)


def _registered_runtime(_ctx: click.Context, _param: click.Parameter, name: str) -> str:
    """``--runtime``: a runtime some loaded plugin registers."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    runtimes = get_plugin_manager().runtimes()
    if name not in runtimes:
        raise click.BadParameter(runtimes.unknown_message(name))
    return name


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
    "--http-port",
    type=click.IntRange(0, 65535),
    help="Port of the monitor's HTTP endpoint: /metrics, /healthz and, with --webhook, "
    "/alertmanager (default monitoring.http_port; 0: no endpoint).",
)
@click.option(
    "--webhook",
    is_flag=True,
    help="Also serve the Alertmanager webhook (POST /alertmanager) on that endpoint; needs the "
    "shared secret in the environment variable named by monitoring.webhook_secret_env.",
)
@click.option(
    "--figures",
    type=click.Choice(["flagged", "all", "none"]),
    default="flagged",
    show_default=True,
    help="Which scored cases get a QC figure (image, prediction, QC reconstruction, "
    "disagreement) in OUT/figures/; none without matplotlib (the report extra).",
)
@click.option(
    "--tracking-uri",
    help="Model registry URI (default registry.uri, else the backend's own: MLflow's is "
    "sqlite:///<cwd>/mlflow.db).",
)
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
    default="torch",
    show_default=True,
    callback=_registered_runtime,
    help="Inference runtime: any registered one (qcloop plugins lists them; onnxruntime, from "
    "the deploy plugin, needs RUN/onnx from qcloop export-onnx).",
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
    http_port: int | None,
    webhook: bool,
    figures: str,
    tracking_uri: str | None,
    once: bool,
    poll_s: float,
    settle_s: float,
    cooldown_s: float,
    runtime: str,
    threads: int | None,
) -> None:
    """Watch INBOX, score each case with the champion models, write masks and QC records to
    OUT, tell plugins what happens (an exporter serves /metrics), and refine on drift alerts
    (own policy or Alertmanager).

    Restartable: finished cases (by content hash, in OUT/ledger.jsonl) are never scored again.
    """
    if (run_dir is None) == (model_spec is None):
        raise click.UsageError("give exactly one of --run RUN or --model PREFIX@ALIAS")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from qcloop.monitor.ops.monitor import Monitor
    from qcloop.monitor.ops.out_lock import OutFolderBusy

    file_cfg = load_config(config_file) if config_file else None
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, registry, champions, follow = _models(
        run_dir, model_spec, file_cfg, tracking_uri, out_dir.resolve() / "models"
    )
    if http_port is not None:
        monitoring = cfg.monitoring.model_copy(update={"http_port": http_port})
        cfg = cfg.model_copy(update={"monitoring": monitoring})
    secret = None
    if webhook:
        if not cfg.monitoring.http_port:
            raise click.UsageError("--webhook needs the HTTP endpoint: --http-port is 0")
        try:
            secret = webhook_secret(cfg.monitoring.webhook_secret_env)
        except WebhookError as exc:
            raise click.ClickException(str(exc)) from None
    refinement = None
    if file_cfg is not None and "refinement" in file_cfg.model_fields_set:
        refinement = file_cfg.refinement
    try:
        mon = Monitor(
            inbox,
            out_dir,
            cfg,
            champions,
            registry=registry,
            follow=follow,
            runtime=runtime,
            refinement=refinement,
            settle_s=settle_s,
            cooldown_s=cooldown_s,
            reload_poll_s=cfg.serving.reload_poll_s,
            webhook_secret=secret,
            figures=figures,
        )
    except (OutFolderBusy, OSError) as exc:  # another monitor; the port cannot be bound
        raise click.ClickException(str(exc)) from None
    try:
        _serve(mon, inbox, out_dir, poll_s, once)
    finally:
        mon.close()
    click.echo(f"records: {out_dir / 'records.jsonl'}; ledger: {out_dir / 'ledger.jsonl'}")


def _models(
    run_dir: Path | None,
    model_spec: str | None,
    file_cfg: QcloopConfig | None,
    tracking_uri: str | None,
    cache_dir: Path,
) -> tuple[QcloopConfig, ModelRegistry, dict[str, ModelRef], str]:
    """The configuration, the model registry, the champions and the followed spec.

    ``--run``: the run is registered where needed and made champion where a model has none;
    the run's configuration (with the ``--config`` file's sections) picks the registry.
    ``--model``: the registry of the ``--config`` file (default backend otherwise) resolves the
    spec; the first champion's configuration, with the file's sections, applies.
    """
    from qcloop.monitor.core.plugin_manager import UnknownComponentError, apply_plugin_settings
    from qcloop.monitor.core.resolve import build_model_registry
    from qcloop.monitor.method.run_folder import load_run_config
    from qcloop.monitor.ops.promotion import ensure_champion

    def merged(run: Path) -> QcloopConfig:
        """The run's configuration with the sections the --config file sets."""
        cfg = load_run_config(run)
        if file_cfg is None:
            return cfg
        return cfg.model_copy(update={k: getattr(file_cfg, k) for k in file_cfg.model_fields_set})

    def registry_of(cfg: QcloopConfig) -> ModelRegistry:
        apply_plugin_settings(cfg)
        try:
            return build_model_registry(cfg, uri=tracking_uri, cache_dir=cache_dir)
        except UnknownComponentError as exc:
            raise click.ClickException(f"registry.backend: {exc}") from None
        except ImportError as exc:  # the backend's extra is not installed (the message says)
            raise click.ClickException(str(exc)) from None

    try:
        if run_dir is not None:
            cfg = merged(run_dir)
            registry = registry_of(cfg)
            prefix = cfg.registry.name_prefix
            champions = ensure_champion(registry, run_dir, name_prefix=prefix)
            return cfg, registry, champions, f"{prefix}@champion"
        assert model_spec is not None
        registry = registry_of(file_cfg or load_config(None))
        champions = registry.resolve(model_spec)
    except ValueError as exc:  # a run or spec the registry refuses (the message names it)
        raise click.ClickException(str(exc)) from None
    if not champions:
        raise click.ClickException(f"--model {model_spec}: selects no registered model")
    cfg = merged(Path(next(iter(champions.values())).run_dir))
    return cfg, registry, champions, model_spec


def _serve(mon: Monitor, inbox: Path, out_dir: Path, poll_s: float, once: bool) -> None:
    """Print where the monitor listens and what it serves, then run it until a signal."""
    for name, url in sorted(mon.service.endpoints.items()):
        click.echo(f"{name}: {url}", err=True)
    for view, served in sorted(mon.views.items()):
        ref = served.reference_median
        click.echo(
            f"{view}: {served.champion.name} version {served.champion.version} "
            f"({served.champion.run_dir}), reference median pDC "
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
