"""``qcloop calibrate``: fences for a model qcloop did not train (a model card) or for masks
another tool wrote, on top of a QC run; the result is a run folder every command accepts."""

from __future__ import annotations

from pathlib import Path

import click

from qcloop.monitor.cli.loop import engine_args, engine_options


@click.command()
@click.option(
    "--run",
    "qc_run",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Run folder holding the QC modules (qcloop qc train, or any trained run).",
)
@click.option(
    "--model",
    "card",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Model card (YAML) of the model to calibrate (docs/your-model.md).",
)
@click.option(
    "--predictions",
    "masks",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Instead of --model: masks another tool already wrote for the reference cases.",
)
@click.option(
    "--predictions-map",
    "mapping_csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="With --predictions: match masks to images by this CSV (columns image,mask).",
)
@click.option(
    "--label-map", help="With --predictions: the masks' label values, e.g. '1:RV,2:MYO,3:LV'."
)
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Reference cases: in-distribution data the model is known to handle (no ground "
    "truth needed).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="New run folder (must not exist, or be empty).",
)
@click.option("--view", type=click.Choice(["SA", "LA", "both"]), default="both", show_default=True)
@click.option(
    "--where",
    multiple=True,
    help="Only reference cases whose metadata matches KEY=VALUE (e.g. vendor=A); repeatable.",
)
@engine_options
def calibrate(
    qc_run: Path,
    card: Path | None,
    masks: Path | None,
    mapping_csv: Path | None,
    label_map: str | None,
    data_dir: Path,
    out: Path,
    view: str,
    where: tuple[str, ...],
    engine: str,
    address: str | None,
    workers: int | None,
    num_gpus_per_worker: float | None,
    batch_size: int | None,
) -> None:
    """Calibrate reference fences for a model qcloop did not train (--model CARD) or for masks
    made elsewhere (--predictions MASKS): the QC module of --run scores every reference case,
    the configured threshold strategy is fitted on those scores, and --out becomes a run folder
    that assess, predict, monitor, serve and models register accept. With --model, --engine ray
    scores the reference cases on a Ray cluster (docs/scale.md)."""
    from qcloop.monitor.core.model_card import ModelCardError
    from qcloop.monitor.core.optional import MissingExtraError
    from qcloop.monitor.data import CaseError
    from qcloop.monitor.method.calibrate import calibrate_masks, calibrate_model
    from qcloop.monitor.method.run_folder import RunError

    if (card is None) == (masks is None):
        raise click.UsageError("give exactly one of --model CARD and --predictions MASKS")
    views = None if view == "both" else [view]
    run_engine = engine_args(engine, address, workers, num_gpus_per_worker, batch_size)
    if masks is not None and engine != "local":
        raise click.UsageError("--predictions runs on the local engine only")
    try:
        if card is not None:
            info = calibrate_model(
                qc_run, card, data_dir, out, views=views, where=_where(where),
                engine_name=run_engine["engine"], engine_params=run_engine["engine_params"],
            )  # fmt: skip
        else:
            info = calibrate_masks(
                qc_run,
                data_dir,
                masks,
                out,
                mapping_csv=mapping_csv,
                label_map=label_map,
                views=views,
                where=_where(where),
            )
    except (RunError, CaseError, ModelCardError, MissingExtraError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    for v, d in info["views"].items():
        pooled = d["fences"].get("all", {})
        click.echo(
            f"{v}: fences from {d['reference_cases']} reference case(s): pDC >= "
            f"{pooled.get('pdc_low', float('nan')):.3f}, pHD <= "
            f"{pooled.get('phd_high', float('nan')):.1f} mm"
        )
        for reason in d["skipped"]:
            click.echo(f"skipped {reason}", err=True)
    click.echo(f"calibrated run written to {out}")


def _where(pairs: tuple[str, ...]) -> dict[str, str] | None:
    """``KEY=VALUE`` pairs as a metadata filter."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--where")
        out[key.strip()] = value.strip()
    return out or None
