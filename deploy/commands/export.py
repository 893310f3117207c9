"""``qcloop export-onnx`` and ``qcloop export-triton``: a run's networks for serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from qcloop.monitor.cli.extras import need

__all__ = ["export_onnx", "export_triton"]

_VIEWS = click.Choice(["SA", "LA", "both"], case_sensitive=False)


def _views(view: str) -> list[str] | None:
    return None if view.lower() == "both" else [view.upper()]


def _need_onnx(command: str, exporter: str = "torchscript") -> None:
    """The ``onnx`` extra: onnx and ONNX Runtime, and onnxscript for the dynamo exporter."""
    modules = ("onnx", "onnxruntime", *(("onnxscript",) if exporter == "dynamo" else ()))
    need(command, "onnx", *modules)


@click.command("export-onnx")
@click.option(
    "--run",
    "run_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Run folder: trained, refined, or calibrated (a model card; qcloop calibrate).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Export folder (default RUN/onnx); a previous export there is replaced.",
)
@click.option("--view", type=_VIEWS, default="both", show_default=True, help="Views to export.")
@click.option("--opset", type=click.IntRange(min=7), default=None, help="ONNX opset.")
@click.option(
    "--data",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Dataset folder for the parity check (default: the run's data folder when it exists, "
    "else phantoms rendered in memory).",
)
@click.option(
    "--cases",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Cases per view for the parity check (LA: four times as many).",
)
@click.option(
    "--exporter",
    type=click.Choice(["dynamo", "torchscript"]),
    default="dynamo",
    show_default=True,
    help="torch.onnx exporter.",
)
@click.option(
    "--parity-atol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
    help="Parity: absolute tolerance on outputs, and on a segmenter's probabilities.",
)  # fmt: skip
@click.option(
    "--parity-rtol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
    help="Parity: tolerance relative to the output's magnitude (as numpy.allclose).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_onnx(
    run_dir: Path,
    out: Path | None,
    view: str,
    opset: int | None,
    data: Path | None,
    cases: int,
    exporter: str,
    parity_atol: float,
    parity_rtol: float,
    as_json: bool,
) -> None:
    """Export every candidate segmenter and the QC module to ONNX, checked against PyTorch."""
    _need_onnx("qcloop export-onnx", exporter)
    from qcloop.deploy.onnx.errors import ExportError, ParityError
    from qcloop.deploy.onnx.export import export_run
    from qcloop.deploy.onnx.parity import ParityTolerance

    target = out or run_dir / "onnx"
    tolerance = ParityTolerance(atol=parity_atol, rtol=parity_rtol)
    try:
        manifest = export_run(
            run_dir, target, views=_views(view), opset=opset, data=data, max_cases=cases,
            exporter=exporter, echo=lambda line: click.echo(line, err=as_json),
            tolerance=tolerance,
        )  # fmt: skip
    except ParityError as exc:
        raise click.ClickException(f"parity check failed: {exc}") from exc
    except ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    _track(run_dir, target, manifest)
    if as_json:
        click.echo(json.dumps(manifest, indent=2, allow_nan=False))
        return
    files = [c["file"] for v in manifest["views"].values() for c in v["candidates"]]
    files += [v["qc"]["file"] for v in manifest["views"].values()]
    click.echo(
        f"exported {len(files)} models (opset {manifest['opset']}) to {target}; "
        f"manifest: {target / 'manifest.json'}"
    )


def _track(run_dir: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Log the export to the run's configured tracker, if any."""
    from qcloop.deploy.onnx.manifest import log_to_tracker
    from qcloop.monitor.core.plugin_manager import get_plugin_manager
    from qcloop.monitor.method.run_folder import load_run_config

    cfg = load_run_config(run_dir)
    if cfg.tracking.tracker is None:
        return
    spec = cfg.tracking.tracker
    try:
        tracker = get_plugin_manager().trackers().create(spec.name, spec.params)
        log_to_tracker(tracker, out, manifest)
    except Exception as exc:
        raise click.ClickException(
            f"the export in {out} is complete, but logging it to tracker {spec.name!r} failed: "
            f"{exc}"
        ) from exc
    click.echo(f"logged the export to tracker {spec.name!r}", err=True)


def _echo_err(line: str) -> None:
    click.echo(line, err=True)


def _write_triton(
    run_dir: Path | None,
    onnx_dir: Path | None,
    out: Path,
    views: list[str] | None,
    *,
    max_batch: int,
    kind: str,
    data: Path | None,
) -> dict[str, Any]:
    """The repository from the export ``onnx_dir``, or from a fresh export of ``run_dir``
    into a temporary folder (with the parity check on ``data``)."""
    import tempfile

    from qcloop.deploy.onnx.export import export_run
    from qcloop.deploy.triton.repository import write_repository

    if onnx_dir is not None:
        return write_repository(onnx_dir, out, max_batch=max_batch, kind=kind, views=views)
    with tempfile.TemporaryDirectory(prefix="qcloop-onnx-") as tmp:
        export = Path(tmp) / "onnx"
        export_run(run_dir, export, views=views, data=data, echo=_echo_err)
        return write_repository(export, out, max_batch=max_batch, kind=kind)


@click.command("export-triton")
@click.option(
    "--run",
    "run_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Trained run folder (exported afresh, with the parity check); or give --onnx.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Model repository folder to write (a previous qcloop repository there is replaced).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="max_batch_size of every model (slices per batch).",
)
@click.option(
    "--onnx",
    "onnx_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Use this existing qcloop ONNX export instead of exporting the run afresh.",
)
@click.option(
    "--instance-kind",
    type=click.Choice(["gpu", "cpu"]),
    default="gpu",
    show_default=True,
    help="instance_group kind (KIND_GPU, or KIND_CPU for nodes without a GPU).",
)
@click.option("--view", type=_VIEWS, default="both", show_default=True, help="Views to export.")
@click.option(
    "--data",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Dataset folder for the parity check of a fresh export.",
)
def export_triton(
    run_dir: Path | None,
    out: Path,
    max_batch: int,
    onnx_dir: Path | None,
    instance_kind: str,
    view: str,
    data: Path | None,
) -> None:
    """Write a Triton model repository: segmenters, QC models and one ensemble per view."""
    if (run_dir is None) == (onnx_dir is None):
        raise click.UsageError("give exactly one of --run RUN and --onnx DIR")
    _need_onnx("qcloop export-triton", "dynamo" if run_dir is not None else "torchscript")
    need("qcloop export-triton", "triton", "google.protobuf")
    from qcloop.deploy.onnx.errors import ExportError, ParityError
    from qcloop.deploy.triton.errors import TritonError

    try:
        summary = _write_triton(
            run_dir, onnx_dir, out, _views(view), max_batch=max_batch, kind=instance_kind,
            data=data,
        )  # fmt: skip
    except ParityError as exc:
        raise click.ClickException(f"parity check failed: {exc}") from exc
    except (ExportError, TritonError) as exc:
        raise click.ClickException(str(exc)) from exc
    for name in summary["models"]:
        click.echo(f"  {name}")
    click.echo(f"wrote {len(summary['models'])} Triton models to {out}")
