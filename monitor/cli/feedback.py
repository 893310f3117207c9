"""``qcloop feedback``: corrected masks for cases a monitor scored, turned into measured
accuracy (the realised Dice/HD beside the estimate, in the monitor's ledger)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The monitor's output folder (its records, ledger and served masks).",
)
@click.option(
    "--masks",
    "masks_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of corrected masks, named by case id or input hash (or with a sidecar JSON).",
)
def feedback(out_dir: Path, masks_dir: Path) -> None:
    """Score the served masks of OUT against the corrected masks in MASKS: per case the
    realised Dice/HD beside QC's estimate (a ledger `feedback` event), and the correction
    stored as labelled data in OUT/labelled/<VIEW>/. Masks that match no case, lie on another
    grid or hold labels outside 0..3 are refused one by one (exit code 1), changing nothing.
    While a monitor runs on OUT, put the masks into OUT/corrected/ instead: it takes them."""
    from qcloop.monitor.ops.feedback import take_feedback
    from qcloop.monitor.ops.files import nifti_suffix
    from qcloop.monitor.ops.ledger import Ledger
    from qcloop.monitor.ops.out_lock import OutFolderBusy, OutLock

    try:
        lock = OutLock(out_dir)
    except OutFolderBusy as exc:
        raise click.ClickException(
            f"{exc}; a running monitor takes corrected masks from {out_dir / 'corrected'}"
        ) from None
    refused = 0
    try:
        ledger = Ledger(out_dir)
        for path in sorted(p for p in masks_dir.iterdir() if p.is_file() and nifti_suffix(p.name)):
            outcome = take_feedback(out_dir, ledger, path)
            if outcome.event is None:
                refused += 1
                click.echo(f"{path.name}: refused: {outcome.reason}")
                continue
            e = outcome.event
            rv = e["scores"].get("RV", {})
            click.echo(
                f"{path.name}: {e['case_id']} realised RV Dice {rv.get('dice', float('nan')):.3f}, "
                f"pDC {rv.get('pdc', float('nan')):.3f}, flagged {e['flagged']}, failed {e['failed']}"
            )
    finally:
        lock.release()
    if refused:
        raise SystemExit(1)
