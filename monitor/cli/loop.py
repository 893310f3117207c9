"""``qcloop train | assess | refine | predict``: the QC loop on a dataset folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def _views(view: str | None) -> list[str] | None:
    return None if view in (None, "both") else [view]


@click.command()
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Dataset folder (M&Ms-2, M&Ms-1 or ACDC layout).",
)
@click.option(
    "--out",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder to write the model set into.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML configuration (default: the built-in one).",
)
@click.option("--view", type=click.Choice(["SA", "LA", "both"]), default="both", show_default=True)
def train(data_dir: Path, run_dir: Path, config_file: Path | None, view: str) -> None:
    """Train candidate segmenters (m_best checkpoints) and the QC module; calibrate fences.

    Resumes from the run's last complete checkpoint when interrupted.
    """
    from qcloop.monitor.core.config import load_config
    from qcloop.monitor.method.train import train_run

    cfg = load_config(config_file)
    info = train_run(data_dir, run_dir, cfg, _views(view))
    for v, d in info["views"].items():
        best = d["candidates"][0]["val_dice"] if d["candidates"] else float("nan")
        click.echo(
            f"{v}: {len(d['candidates'])} candidate(s), best validation Dice {best:.3f}, "
            f"{d['train_cases']} training / {d['val_cases']} validation cases"
        )
    click.echo(f"run written to {run_dir}")


def _print_summary(summary: dict, out: Path) -> None:
    for v, d in summary["views"].items():
        click.echo(f"{v}: {d['cases']} case(s), {d['ood']} flagged OoD ({d['population']} fences)")
    for s in summary["skipped"]:
        click.echo(f"skipped {s['path']}: {s['reason']}", err=True)
    click.echo(f"records: {out / 'records.jsonl'}; summary: {out / 'summary.json'}")


_data = click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Dataset folder.",
)
_run = click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Run folder.",
)
_out = click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder.",
)
_view = click.option(
    "--view", type=click.Choice(["SA", "LA", "both"]), default="both", show_default=True
)


_run_or_model = [
    click.option(
        "--run",
        "run_dir",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Run folder (or give --model).",
    ),
    click.option(
        "--model",
        "model_spec",
        help="Registered models instead of a run folder: PREFIX@ALIAS (e.g. qcloop@champion), "
        "PREFIX-SA@ALIAS or PREFIX-SA/VERSION.",
    ),
    click.option(
        "--tracking-uri",
        help="Where the registry for --model lives (MLflow: a tracking URI; default "
        "MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db).",
    ),
]


def _run_or_model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_run_or_model):
        f = option(f)
    return f


def _models(
    run_dir: Path | None, model_spec: str | None, tracking_uri: str | None
) -> tuple[Path | dict[str, Path], dict[str, dict] | None]:
    """The run folder, or the registered versions' folders per view and their identity."""
    if (run_dir is None) == (model_spec is None):
        raise click.UsageError("give exactly one of --run RUN or --model PREFIX@ALIAS")
    if run_dir is not None:
        return run_dir, None
    from qcloop.monitor.cli.models import open_registry, registry_errors

    with registry_errors():
        refs = open_registry(tracking_uri).resolve(str(model_spec))
    for v, ref in sorted(refs.items()):
        click.echo(f"{v}: {ref.name} version {ref.version} ({', '.join(ref.aliases)})", err=True)
    runs = {v: ref.run_dir for v, ref in refs.items()}
    info = {v: {"name": ref.name, "version": ref.version} for v, ref in refs.items()}
    return runs, info


@click.command()
@_data
@_run_or_model_options
@_out
@_view
def assess(
    data_dir: Path,
    run_dir: Path | None,
    model_spec: str | None,
    tracking_uri: str | None,
    out_dir: Path,
    view: str,
) -> None:
    """Score every case with all candidates and the QC module: pDC/pHD, fences, OoD flags.

    Writes one JSON record per case to OUT/records.jsonl and OUT/summary.json.
    """
    from qcloop.monitor.method.assess import assess_run

    runs, info = _models(run_dir, model_spec, tracking_uri)
    summary = assess_run(data_dir, runs, out_dir, views=_views(view), model_info=info)
    _print_summary(summary, out_dir)


@click.command()
@_data
@_run_or_model_options
@_out
@_view
def predict(
    data_dir: Path,
    run_dir: Path | None,
    model_spec: str | None,
    tracking_uri: str | None,
    out_dir: Path,
    view: str,
) -> None:
    """Write QC-selected masks (NIfTI, original grid, affine and header) and their records."""
    from qcloop.monitor.method.assess import assess_run

    runs, info = _models(run_dir, model_spec, tracking_uri)
    summary = assess_run(
        data_dir, runs, out_dir, write_masks=True, views=_views(view), model_info=info
    )
    _print_summary(summary, out_dir)
    click.echo(f"masks: {out_dir / 'masks'}")


@click.command()
@_data
@_run
@click.option(
    "--out",
    "out_run",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the refined model set (never the original run).",
)
@click.option(
    "--labelled",
    "labelled_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Labelled data anchoring the refinement (default: the run's training data).",
)
@_view
def refine(
    data_dir: Path, run_dir: Path, out_run: Path, labelled_dir: Path | None, view: str
) -> None:
    """Refine every candidate on the OoD cases of DATA; save the refined set beside the run."""
    from qcloop.monitor.method.refine import refine_run

    info = refine_run(data_dir, run_dir, out_run, labelled_dir=labelled_dir, views=_views(view))
    for v, d in info["views"].items():
        ood_after = [
            h["epochs"][-1]["ood"] if h.get("epochs") else h.get("ood_before") for h in d["history"]
        ]
        click.echo(
            f"{v}: {d['flagged']} of {d['cases']} case(s) flagged; refiner {d['refiner']}; "
            f"still OoD per candidate after refinement: {json.dumps(ood_after)}"
        )
    click.echo(f"refined run written to {out_run}")
