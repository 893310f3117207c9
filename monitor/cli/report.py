"""``qcloop report``: one offline HTML page for a demo, an assess/predict output or a monitor."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The page to write (default FOLDER/report.html).",
)
def report(folder: Path, out: Path | None) -> None:
    """Write one self-contained HTML page for FOLDER (a demo folder, an assess or predict
    output, or a monitor's OUT): the ablation table where there is one, pDC against true Dice
    and the failure ROC where ground truth exists, pDC/pHD distributions with the fences,
    flagged cases per vendor, a monitor's window over time, and the cases (sortable, with their
    figures and masks). Nothing on the page reaches the network."""
    from qcloop.monitor.core.optional import MissingExtraError
    from qcloop.monitor.report.page import write_report
    from qcloop.monitor.report.sources import ReportError

    out = out or folder / "report.html"
    try:
        info = write_report(folder, out)
    except (ReportError, MissingExtraError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"report: {info['path']} ({info['bytes'] / 1e6:.2f} MB, {info['seconds']:.1f} s)")
