"""``qcloop train | assess | refine | predict``: the QC loop on a dataset folder."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
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
        how = "not judged: no fences" if d["population"] == "none" else f"{d['population']} fences"
        click.echo(f"{v}: {d['cases']} case(s), {d['ood']} flagged OoD ({how})")
    for s in summary["skipped"]:
        click.echo(f"skipped {s['path']}: {s['reason']}", err=True)
    click.echo(f"records: {out}/records.jsonl; summary: {out}/summary.json")


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


class OutFolder(click.ParamType):
    """An output folder (a ``Path``), or a URI of a pyarrow filesystem kept as text
    (``s3://bucket/qc``; a ``Path`` would fold its ``//``)."""

    name = "FOLDER|URI"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from qcloop.monitor.core.object_store import is_uri

        if isinstance(value, str) and is_uri(value):
            return value
        path = Path(value)
        if path.exists() and not path.is_dir():
            self.fail(f"{path} is a file, not a folder", param, ctx)
        return path


_out = click.option(
    "--out",
    "out_dir",
    required=True,
    type=OutFolder(),
    help="Output folder, or a URI on object storage (s3://bucket/qc, gs://..., file://...; the "
    "ray extra's pyarrow): outputs are written locally, then copied there.",
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


_predictions = [
    click.option(
        "--predictions",
        "masks",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Score the NIfTI masks under this folder, made by another tool, instead of running "
        "any model: each is matched to its case by the subject, view and phase in its file name "
        "(e.g. 001_SA_ED_pred.nii.gz). Needs --run, which may be a QC-only run (qcloop qc train).",
    ),
    click.option(
        "--predictions-map",
        "mapping_csv",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Match masks to images by this CSV (columns image,mask; paths relative to the CSV; "
        "an optional phase column for cine files) instead of by file names.",
    ),
    click.option(
        "--label-map",
        help="What the masks' values are, e.g. '1:RV,2:MYO,3:LV' (default qcloop's 1 LV, 2 MYO, "
        "3 RV; 0 is background); any other value is an error unless mapped, e.g. '4:BG'.",
    ),
]


def _predictions_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options of ``assess`` that score masks made elsewhere."""
    for option in reversed(_predictions):
        f = option(f)
    return f


_cases = click.option(
    "--data",
    "data_dir",
    required=True,
    help="The cases: a dataset folder (M&Ms-2, M&Ms-1 or ACDC layout), a CSV or Parquet case "
    "list (columns image, view, [phase, frame, subject, gt, metadata...]) or a quoted glob of "
    "image files inside a dataset folder.",
)

ENGINE_OPTIONS = [
    click.option(
        "--engine",
        default="local",
        show_default=True,
        help="Where the per-case work runs: local (this process) or ray (a Ray cluster; the ray "
        "extra). Records are the same either way.",
    ),
    click.option("--address", help="Ray: the cluster to join (default: start a local one)."),
    click.option("--workers", type=click.IntRange(min=1), help="Ray: actors per view."),
    click.option(
        "--num-gpus-per-worker",
        type=click.FloatRange(min=0),
        help="Ray: GPUs each actor reserves (its models run on CUDA).",
    ),
    click.option(
        "--batch-size", type=click.IntRange(min=1), help="Ray: cases per actor call (default 8)."
    ),
]


def engine_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(ENGINE_OPTIONS):
        f = option(f)
    return f


def engine_args(
    engine: str, address: str | None, workers: int | None, gpus: float | None, batch: int | None
) -> dict[str, Any]:
    """``engine`` and the parameters given for it (a usage error for an unknown engine)."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    names = get_plugin_manager().engines().names()
    if engine not in names:
        raise click.BadParameter(
            f"{engine!r} is not one of {', '.join(names)}", param_hint="--engine"
        )
    params = {"address": address, "workers": workers, "num_gpus_per_worker": gpus}
    params["batch_size"] = batch
    given = {k: v for k, v in params.items() if v is not None}
    if engine == "local" and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise click.UsageError(f"{flags} apply to --engine ray only")
    return {"engine": engine, "engine_params": given}


_figures = click.option(
    "--figures",
    type=click.Choice(["flagged", "all", "none"]),
    default="none",
    show_default=True,
    help="Write a QC figure (image, prediction, QC reconstruction, disagreement) per flagged "
    "case, or per case, to OUT/figures/ (needs the report extra).",
)


@click.command()
@_cases
@_run_or_model_options
@_out
@_view
@_predictions_options
@_figures
@engine_options
def assess(
    data_dir: str,
    run_dir: Path | None,
    model_spec: str | None,
    tracking_uri: str | None,
    out_dir: Path | str,
    view: str,
    masks: Path | None,
    mapping_csv: Path | None,
    label_map: str | None,
    figures: str,
    engine: str,
    address: str | None,
    workers: int | None,
    num_gpus_per_worker: float | None,
    batch_size: int | None,
) -> None:
    """Score every case with all candidates and the QC module: pDC/pHD, fences, OoD flags.

    With --predictions (or --predictions-map), score masks another tool already wrote with the
    run's QC module instead; no model runs. Writes one JSON record per case to
    OUT/records.jsonl and OUT/summary.json. With --engine ray the cases are scored on a Ray
    cluster (docs/scale.md).
    """
    run_engine = engine_args(engine, address, workers, num_gpus_per_worker, batch_size)
    if masks is not None or mapping_csv is not None:
        if run_dir is None or model_spec is not None:
            raise click.UsageError("--predictions scores masks with a run's QC module: give --run")
        if figures != "none":
            raise click.UsageError("--figures draws the run's own predictions, not --predictions")
        if engine != "local" or not isinstance(out_dir, Path):
            raise click.UsageError("--predictions runs on the local engine, into a folder")
        _assess_predictions(Path(data_dir), run_dir, masks, mapping_csv, label_map, out_dir, view)
        return
    if label_map is not None:
        raise click.UsageError("--label-map describes the masks of --predictions")
    from qcloop.monitor.method.assess import assess_run

    runs, info = _models(run_dir, model_spec, tracking_uri)
    _refuse_qc_only(run_dir)
    with _clear_errors():
        summary = assess_run(
            data_dir,
            runs,
            out_dir,
            views=_views(view),
            model_info=info,
            figures=figures,
            **run_engine,
        )
    _print_summary(summary, out_dir)


@contextlib.contextmanager
def _clear_errors() -> Iterator[None]:
    """A run folder or a dataset that cannot be used: its message, without a traceback."""
    from qcloop.monitor.core.optional import MissingExtraError
    from qcloop.monitor.data import CaseError
    from qcloop.monitor.method.run_folder import RunError

    try:
        yield
    except (RunError, CaseError, MissingExtraError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def _assess_predictions(
    data_dir: Path,
    run_dir: Path,
    masks: Path | None,
    mapping_csv: Path | None,
    label_map: str | None,
    out_dir: Path,
    view: str,
) -> None:
    """``qcloop assess --predictions``: the masks scored, the summary printed."""
    from qcloop.monitor.data import CaseError
    from qcloop.monitor.method.mask_files import parse_label_map
    from qcloop.monitor.method.predictions import assess_predictions
    from qcloop.monitor.method.run_folder import RunError

    try:
        lut = parse_label_map(label_map)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--label-map") from None
    try:
        summary = assess_predictions(
            data_dir,
            run_dir,
            masks,
            out_dir,
            views=_views(view),
            mapping_csv=mapping_csv,
            label_map=lut,
        )
    except (RunError, CaseError) as exc:
        raise click.ClickException(str(exc)) from None
    _print_summary(summary, out_dir)
    if any(d["population"] == "none" for d in summary["views"].values()):
        click.echo(
            "warning: the run has no fences, so no case is judged (ood null); calibrate it on "
            "the monitored model to flag OoD cases (qcloop calibrate)",
            err=True,
        )


def _refuse_qc_only(run_dir: Path | None) -> None:
    """A usage error when ``run_dir`` holds QC modules only: there are no candidates to run."""
    from qcloop.monitor.method.run_folder import is_qc_only, qc_only_error

    if run_dir is not None and is_qc_only(run_dir):
        raise click.ClickException(
            f"{qc_only_error(run_dir)}; or score masks made elsewhere with --predictions"
        )


@click.command()
@_cases
@_run_or_model_options
@_out
@_view
@_figures
@engine_options
def predict(
    data_dir: str,
    run_dir: Path | None,
    model_spec: str | None,
    tracking_uri: str | None,
    out_dir: Path | str,
    view: str,
    figures: str,
    engine: str,
    address: str | None,
    workers: int | None,
    num_gpus_per_worker: float | None,
    batch_size: int | None,
) -> None:
    """Write QC-selected masks (NIfTI, original grid, affine and header) and their records
    (with --engine ray, written by the Ray workers: docs/scale.md)."""
    from qcloop.monitor.method.assess import assess_run

    run_engine = engine_args(engine, address, workers, num_gpus_per_worker, batch_size)
    runs, info = _models(run_dir, model_spec, tracking_uri)
    _refuse_qc_only(run_dir)
    with _clear_errors():
        summary = assess_run(
            data_dir,
            runs,
            out_dir,
            write_masks=True,
            views=_views(view),
            model_info=info,
            figures=figures,
            **run_engine,
        )
    _print_summary(summary, out_dir)
    click.echo(f"masks: {out_dir}/masks")


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
    from qcloop.monitor.method.run_folder import RunError

    _refuse_qc_only(run_dir)
    try:
        info = refine_run(data_dir, run_dir, out_run, labelled_dir=labelled_dir, views=_views(view))
    except RunError as exc:
        raise click.ClickException(str(exc)) from None
    for v, d in info["views"].items():
        ood_after = [
            h["epochs"][-1]["ood"] if h.get("epochs") else h.get("ood_before") for h in d["history"]
        ]
        click.echo(
            f"{v}: {d['flagged']} of {d['cases']} case(s) flagged; refiner {d['refiner']}; "
            f"still OoD per candidate after refinement: {json.dumps(ood_after)}"
        )
    click.echo(f"refined run written to {out_run}")
