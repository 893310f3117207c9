"""``qcloop data``: look at a dataset folder before using it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click
import numpy as np

from qcloop.monitor import STRUCTURES

_GROUPINGS = ("layout", "view", "phase", "vendor", "split", "disease")


@click.group("data")
def data() -> None:
    """Inspect datasets in the public layouts (M&Ms-2, M&Ms-1, ACDC)."""


@data.command("summary")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--layout",
    type=click.Choice(["auto", "mnms2", "mnms1", "acdc"]),
    default="auto",
    show_default=True,
    help="Dataset layout; auto detects it from the file names.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def summary(directory: Path, layout: str, as_json: bool) -> None:
    """Load every case under DIRECTORY and report counts, grids, label volumes and bad cases.

    Exits with status 1 when no case could be read.
    """
    from qcloop.monitor.data import CaseError, discover, iter_cases

    try:
        sources = discover(directory, layout)
    except CaseError as exc:
        raise click.ClickException(str(exc)) from exc
    errors: list[CaseError] = []
    report = summarise(iter_cases(sources, errors), errors)
    found = sorted({s.layout for s in sources}) or [layout]
    report = {
        "root": str(directory),
        "layout": ",".join(found),
        "discovered": len(sources),
        **report,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2, allow_nan=False))
    else:
        click.echo(format_summary(report))
    if report["loaded"] == 0:
        raise click.exceptions.Exit(1)


def summarise(cases: Iterable[Any], errors: list[Any]) -> dict[str, Any]:
    """Counts, shape and spacing ranges, label volumes per view/phase, and the bad cases.

    ``errors`` is read after ``cases`` is exhausted (it may be filled while iterating).
    """
    counts: dict[str, Counter[str]] = {name: Counter() for name in _GROUPINGS}
    shapes: list[tuple[int, int, int]] = []
    spacings: list[tuple[float, float, float]] = []
    volumes: dict[str, dict[str, Any]] = {}
    for case in cases:
        source = case.source
        for name, value in zip(
            _GROUPINGS,
            (source.layout, source.view, source.phase, source.vendor, source.split, source.disease),
            strict=True,
        ):
            counts[name][value] += 1
        shapes.append(case.shape)
        spacings.append(case.spacing)
        if case.gt is None:
            continue
        group = volumes.setdefault(
            f"{source.view}/{source.phase}",
            {"cases": 0, **{s: {"voxels": 0, "ml": 0.0} for s in STRUCTURES}},
        )
        group["cases"] += 1
        per_label = np.bincount(case.gt.ravel(), minlength=4)
        for name, label in STRUCTURES.items():
            group[name]["voxels"] += int(per_label[label])
            group[name]["ml"] += float(per_label[label]) * case.voxel_volume_ml
    for group in volumes.values():
        for name in STRUCTURES:
            stats = group[name]
            stats["mean_ml"] = round(stats.pop("ml") / group["cases"], 2)

    def axis_range(rows: list[tuple[float, ...]]) -> dict[str, list[float]]:
        if not rows:
            return {"min": [], "max": []}
        array = np.asarray(rows, dtype=np.float64)
        return {"min": array.min(axis=0).tolist(), "max": array.max(axis=0).tolist()}

    shape_range = axis_range(shapes)
    shape_range = {k: [int(v) for v in vs] for k, vs in shape_range.items()}
    spacing_range = {k: [round(v, 4) for v in vs] for k, vs in axis_range(spacings).items()}
    return {
        "loaded": len(shapes),
        "failed": len(errors),
        "counts": {name: dict(sorted(c.items())) for name, c in counts.items()},
        "shape": shape_range,
        "spacing_mm": spacing_range,
        "label_volumes": dict(sorted(volumes.items())),
        "bad_cases": [
            {"key": e.key or "", "path": str(e.path), "reason": e.reason} for e in errors
        ],
    }


def format_summary(report: dict[str, Any]) -> str:
    """The summary as plain text for a terminal."""
    lines = [
        f"dataset {report['root']} (layout {report['layout']})",
        f"cases: {report['discovered']} discovered, {report['loaded']} loaded, "
        f"{report['failed']} failed",
    ]
    for name, counter in report["counts"].items():
        items = ", ".join(f"{k or '-'} {v}" for k, v in counter.items()) or "-"
        lines.append(f"  by {name}: {items}")
    if report["loaded"]:
        lines.append(
            "shape X x Y x Z: "
            + " to ".join("x".join(str(n) for n in report["shape"][k]) for k in ("min", "max"))
        )
        lines.append(
            "spacing mm X x Y x Z: "
            + " to ".join(
                "x".join(f"{s:g}" for s in report["spacing_mm"][k]) for k in ("min", "max")
            )
        )
    if report["label_volumes"]:
        names = list(STRUCTURES)
        lines.append("label volumes (ground truth; voxels in total, mean mL per case):")
        header = f"  {'view/phase':<12}{'cases':>6}" + "".join(
            f"{n + ' vox':>12}{n + ' mL':>9}" for n in names
        )
        lines.append(header)
        for group, stats in report["label_volumes"].items():
            row = f"  {group:<12}{stats['cases']:>6}" + "".join(
                f"{stats[n]['voxels']:>12}{stats[n]['mean_ml']:>9.1f}" for n in names
            )
            lines.append(row)
    else:
        lines.append("label volumes: no case with ground truth")
    if report["bad_cases"]:
        lines.append(f"bad cases ({len(report['bad_cases'])}):")
        lines.extend(
            f"  {b['key'] or '?'}: {b['path']}: {b['reason']}" for b in report["bad_cases"]
        )
    return "\n".join(lines)
