"""``qcloop train | assess | refine | predict``: the QC loop on a dataset folder."""

from __future__ import annotations

import json
from pathlib import Path

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
    from qcloop.monitor.config import load_config
    from qcloop.monitor.pipeline import train_run

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


@click.command()
@_data
@_run
@_out
@_view
def assess(data_dir: Path, run_dir: Path, out_dir: Path, view: str) -> None:
    """Score every case with all candidates and the QC module: pDC/pHD, fences, OoD flags.

    Writes one JSON record per case to OUT/records.jsonl and OUT/summary.json.
    """
    from qcloop.monitor.pipeline import assess_run

    _print_summary(assess_run(data_dir, run_dir, out_dir, views=_views(view)), out_dir)


@click.command()
@_data
@_run
@_out
@_view
def predict(data_dir: Path, run_dir: Path, out_dir: Path, view: str) -> None:
    """Write QC-selected masks (NIfTI, original grid, affine and header) and their records."""
    from qcloop.monitor.pipeline import assess_run

    summary = assess_run(data_dir, run_dir, out_dir, write_masks=True, views=_views(view))
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
    from qcloop.monitor.pipeline import refine_run

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
