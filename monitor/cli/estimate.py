"""``qcloop fit-estimator`` and ``qcloop evaluate-qc``: the calibrated quality estimate fitted on
labelled reference cases, and measured against ground truth."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from qcloop.monitor.cli.loop import _clear_errors, _run, _view, _views

_data = click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Labelled cases (images with ground truth).",
)
_where = click.option(
    "--where",
    "where_pairs",
    multiple=True,
    help="Only cases whose metadata matches KEY=VALUE[,VALUE...] (e.g. SPLIT=val,ladder); "
    "repeatable.",
)
_predictions = click.option(
    "--predictions",
    "masks",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Score these masks (made by another tool) instead of running the run's candidates.",
)
_failure = click.option(
    "--failure-dice",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.8,
    show_default=True,
    help="A case whose true Dice is below this has failed.",
)


def parse_where(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    """``KEY=VALUE[,VALUE...]`` pairs as a metadata filter."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--where")
        values = [v.strip() for v in value.split(",")]
        out[key.strip()] = values if len(values) > 1 else values[0]
    return out or None


def score_labelled(
    data_dir: Path,
    run_dir: Path,
    view: str,
    where: dict[str, Any] | None,
    masks: Path | None,
    out: Path,
) -> Iterator[dict[str, Any]]:
    """The records of the labelled cases, scored by the run (or its QC module, for ``masks``)
    into ``out``. The fences flag them even where the run flags on the estimate: the estimate
    may be what is about to be fitted, and the figures here do not depend on the flag."""
    from qcloop.monitor.method.assess import assess_run
    from qcloop.monitor.method.predictions import assess_predictions

    with _clear_errors():
        if masks is not None:
            summary = assess_predictions(
                data_dir, run_dir, masks, out, views=_views(view), where=where,
                estimate_flags=False,
            )  # fmt: skip
        else:
            summary = assess_run(
                data_dir, run_dir, out, views=_views(view), where=where, estimate_flags=False
            )
    for s in summary["skipped"]:
        click.echo(f"skipped {s['path']}: {s['reason']}", err=True)
    with open(out / "records.jsonl") as f:
        for line in f:
            yield json.loads(line)


@click.command("fit-estimator")
@_run
@_data
@_where
@_predictions
@_view
@click.option("--calibrator", default="isotonic", show_default=True, help="Registered calibrator.")
@click.option(
    "--level",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.9,
    show_default=True,
    help="Nominal coverage of the prediction interval.",
)
@_failure
def fit_estimator_command(
    run_dir: Path,
    data_dir: Path,
    where_pairs: tuple[str, ...],
    masks: Path | None,
    view: str,
    calibrator: str,
    level: float,
    failure_dice: float,
) -> None:
    """Fit the calibrated quality estimate (est_dice, est_hd_mm) of RUN on labelled cases and
    store it in the run (RUN/<VIEW>/estimator.json); assess and predict then add it to records.

    Fit it on cases the run will meet, with failures among them: the reference cases plus,
    for example, labelled cases of the shifts it is expected to face.
    """
    from qcloop.monitor.core.plugin_manager import get_plugin_manager
    from qcloop.monitor.method.quality_estimate import fit_estimator, save_estimator

    calibrators = get_plugin_manager().calibrators()
    if calibrator not in calibrators:
        raise click.BadParameter(calibrators.unknown_message(calibrator), param_hint="--calibrator")
    where = parse_where(where_pairs)
    with tempfile.TemporaryDirectory(prefix="qcloop-fit-") as tmp:
        records = list(score_labelled(data_dir, run_dir, view, where, masks, Path(tmp)))
    views = sorted({r["view"] for r in records})
    if not views:
        raise click.ClickException(f"{data_dir}: no case to fit on (check --where and --view)")
    for v in views:
        mine = [r for r in records if r["view"] == v]
        fitted_on = {"data": str(data_dir.resolve()), "where": where, "cases": len(mine)}
        est = fit_estimator(
            mine, calibrators, calibrator, level=level, failure_dice=failure_dice,
            fitted_on=fitted_on,
        )  # fmt: skip
        path = save_estimator(run_dir / v, est)
        _echo_fit(v, est.to_dict(), path)


def _echo_fit(view: str, data: dict[str, Any], path: Path) -> None:
    for s, targets in data["structures"].items():
        d, h = targets["dice"], targets["hd_mm"]
        how = (
            f"+-{d['halfwidth']:.3f} Dice, +-{h['halfwidth']:.1f} mm at {data['level']:.0%}"
            if d["source"] == "calibrated"
            else "falls back to pDC/pHD"
        )
        click.echo(
            f"{view} {s}: {d['cases']} cases, {d['failures']} failures, {data['calibrator']}: {how}"
        )
    for w in data["warnings"]:
        click.echo(f"warning: {view} {w}", err=True)
    click.echo(f"{view}: {path}")


@click.command("evaluate-qc")
@_run
@_data
@_where
@_predictions
@_view
@_failure
@click.option(
    "--group", default="vendor", show_default=True, help="Record field the rows are grouped by."
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the rows as JSON.",
)
@click.option(
    "--records",
    "records_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the scored records in this folder (default: a temporary one).",
)
def evaluate_qc(
    run_dir: Path,
    data_dir: Path,
    where_pairs: tuple[str, ...],
    masks: Path | None,
    view: str,
    failure_dice: float,
    group: str,
    json_out: Path | None,
    records_dir: Path | None,
) -> None:
    """How well the run's quality estimates track true Dice on labelled cases: per group,
    view and structure, est_dice and pDC side by side (Pearson and Spearman r, MAE, interval
    coverage, failure AUROC and accuracy at --failure-dice)."""
    from qcloop.monitor.core import atomic
    from qcloop.monitor.method.qc_evaluation import qc_markdown, qc_rows

    where = parse_where(where_pairs)
    with tempfile.TemporaryDirectory(prefix="qcloop-evalqc-") as tmp:
        out = records_dir or Path(tmp)
        records = list(score_labelled(data_dir, run_dir, view, where, masks, out))
    rows = qc_rows(records, failure_dice=failure_dice, group=group)
    if not rows:
        raise click.ClickException(f"{data_dir}: no scored case has ground truth")
    if not any("estimate" in r for r in records):
        click.echo("note: the run has no estimator (qcloop fit-estimator): est = pDC", err=True)
    click.echo(f"failure: true Dice < {failure_dice}; est: calibrated estimate; pDC: pseudo-Dice")
    click.echo(qc_markdown(rows, group), nl=False)
    if json_out is not None:
        meta = {"run": str(run_dir.resolve()), "data": str(data_dir.resolve()), "where": where}
        atomic.write_json(json_out, {**meta, "failure_dice": failure_dice, "rows": rows})
