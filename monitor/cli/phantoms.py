"""``qcloop phantoms`` (write a phantom cohort) and ``qcloop phantoms-gallery`` (its pictures)."""

from __future__ import annotations

from pathlib import Path

import click

PRESET_NAMES = ("default", "small", "tiny")


@click.command("phantoms")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--preset",
    type=click.Choice(PRESET_NAMES),
    default="default",
    show_default=True,
    help="Cohort size: default (vendor A 60/10/20, B and C 20 test each, severity ladder), "
    "small (quick demos) or tiny (tests, 64-96 px).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every draw.")
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Processes (default: every CPU)."
)
def phantoms(out_dir: Path, preset: str, seed: int, workers: int | None) -> None:
    """Write a phantom cohort to OUT_DIR in the M&Ms-2 layout (NNN/NNN_{SA,LA}_{ED,ES}.nii.gz,
    ground truth *_gt.nii.gz, dataset_information.csv)."""
    from qcloop.monitor.phantoms import write_cohort

    try:
        summary = write_cohort(out_dir, preset=preset, seed=seed, workers=workers)
    except FileExistsError as exc:
        raise click.ClickException(str(exc)) from exc
    n = len(summary.subjects)
    click.echo(f"{summary.out_dir}: {n} subjects, {summary.files} files in {summary.seconds:.1f} s")
    click.echo("subjects per vendor / split:")
    for (vendor, split), count in summary.counts("vendor", "split").items():
        click.echo(f"  {vendor} {split:<7} {count:4d}")
    click.echo("subjects per disease (regular splits):")
    regular = [s for s in summary.subjects if s.split != "ladder"]
    diseases: dict[str, int] = {}
    for s in regular:
        diseases[s.disease] = diseases.get(s.disease, 0) + 1
    click.echo("  " + ", ".join(f"{d} {c}" for d, c in sorted(diseases.items())))
    ladder = summary.counts("shift_knob")
    ladder.pop(("",), None)
    if ladder:
        knobs = ", ".join(k for (k,) in ladder)
        click.echo(
            f"severity ladder: {sum(ladder.values())} subjects (knobs: {knobs}; severities 1-5)"
        )


@click.command("phantoms-gallery")
@click.argument("out_png_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subjects shown.")
def gallery(out_png_dir: Path, seed: int) -> None:
    """Render example phantom slices per vendor and per pathology into OUT_PNG_DIR
    (phantom-vendors.png, phantom-pathologies.png). Needs the report extra (matplotlib)."""
    from qcloop.monitor.cli.extras import need

    need("qcloop phantoms-gallery", "report", "matplotlib")
    from qcloop.monitor.phantoms.gallery import write_gallery

    for path in write_gallery(out_png_dir, seed=seed):
        click.echo(str(path))
