"""``qcloop qc``: the QC module on its own, for segmenters qcloop did not train."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def qc() -> None:
    """The QC module without a segmenter: it needs ground-truth masks only."""


@qc.command("train")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Labelled dataset folder (M&Ms-2, M&Ms-1 or ACDC layout); only its masks are learnt.",
)
@click.option(
    "--out",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="New run folder for the QC modules (must not exist, or be empty).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML configuration (default: the built-in one).",
)
@click.option("--view", type=click.Choice(["SA", "LA", "both"]), default="both", show_default=True)
def train(data_dir: Path, run_dir: Path, config_file: Path | None, view: str) -> None:
    """Train the QC module of each view on ground-truth masks only.

    Writes a run folder with QC modules and no candidates or fences (qcloop calibrate adds
    those for the monitored model). Masks made by any segmenter can then be scored with
    qcloop assess --predictions.
    """
    from qcloop.monitor.core.config import load_config
    from qcloop.monitor.data import CaseError
    from qcloop.monitor.method.qc_train import train_qc_run
    from qcloop.monitor.method.run_folder import RunError

    cfg = load_config(config_file)
    try:
        info = train_qc_run(data_dir, run_dir, cfg, None if view == "both" else [view])
    except (RunError, CaseError) as exc:
        raise click.ClickException(str(exc)) from None
    for v, d in info["views"].items():
        click.echo(
            f"{v}: QC module trained on {d['train_slices']} mask slice(s) of "
            f"{d['train_cases']} case(s), validated on {d['val_cases']} case(s)"
        )
        for reason in d["skipped"]:
            click.echo(f"skipped {reason}", err=True)
    click.echo(f"QC-only run written to {run_dir} (no candidates, no fences)")
