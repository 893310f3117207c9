"""``qcloop bench loop``: the QC loop's cost per case and stage, its throughput and memory
against the case count per engine, the monitor's restart time and the refinement's cost per
epoch (:mod:`qcloop.monitor.benchmarks.loop`)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import click


def _ints(text: str) -> list[int]:
    try:
        values = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated integers") from None
    if any(v < 0 for v in values):
        raise click.BadParameter(f"{text!r}: counts cannot be negative")
    return values


@click.command("loop")
@click.option(
    "--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Dataset folder (e.g. phantoms) whose cases are scored, repeated up to each size.",
)
@click.option(
    "--view",
    "views",
    multiple=True,
    type=click.Choice(["SA", "LA"]),
    default=["SA"],
    show_default=True,
    help="Views of the stage costs; the first one for the rest.",
)
@click.option("--stage-cases", type=click.IntRange(min=1), default=20, show_default=True)
@click.option(
    "--sizes", default="100,1000", show_default=True, help="Case counts of the throughput runs."
)
@click.option(
    "--engines",
    default="local,ray1,ray2",
    show_default=True,
    help="local, ray1, ray2 (Ray with 1 or 2 workers), ...; empty to skip.",
)
@click.option("--ledger-lines", default="100000", show_default=True, help="0 to skip.")
@click.option(
    "--windows",
    default="4,8,16",
    show_default=True,
    help="Flagged-window sizes of the refinement cost; empty to skip.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write every figure to this JSON file (for --compare later).",
)
@click.option(
    "--compare",
    "previous",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A --json file of an earlier run: print each figure's change.",
)
def loop(
    run_dir: Path, data: Path, views: tuple[str, ...], stage_cases: int, sizes: str,
    engines: str, ledger_lines: str, windows: str, json_path: Path | None, previous: Path | None,
) -> None:  # fmt: skip
    """What the QC loop costs: stages per case, throughput and peak memory per engine and case
    count, monitor restart with a long ledger, refinement seconds per epoch."""
    names = [e.strip() for e in engines.split(",") if e.strip()]
    bad = [e for e in names if e != "local" and not (e.startswith("ray") and e[3:].isdigit())]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)}: use local or rayN", param_hint="--engines")
    from qcloop.monitor.method.run_folder import RunError

    try:
        figures = _measure(run_dir, data, views, stage_cases, sizes, names, ledger_lines, windows)
    except (RunError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    _print(figures, json_path, previous)


def _measure(
    run_dir: Path, data: Path, views: tuple[str, ...], stage_cases: int, sizes: str,
    names: list[str], ledger_lines: str, windows: str,
) -> dict[str, Any]:  # fmt: skip
    from qcloop.monitor.benchmarks.loop import run_loop_benchmark

    engines = ",".join(names)
    return run_loop_benchmark(
        run_dir, data, views=views, stage_cases=stage_cases, sizes=_ints(sizes), engines=names,
        ledger_lines=(_ints(ledger_lines) or [0])[0], windows=_ints(windows),
        command=_command(run_dir, data, views, stage_cases, sizes, engines, ledger_lines, windows),
    )  # fmt: skip


def _print(figures: dict[str, Any], json_path: Path | None, previous: Path | None) -> None:
    from qcloop.monitor.benchmarks.loop import compare_figures
    from qcloop.monitor.core import atomic

    click.echo(loop_table(figures))
    if json_path is not None:
        atomic.write_json(json_path, figures)
        click.echo(f"figures written to {json_path}")
    if previous is not None:
        rows = compare_figures(json.loads(previous.read_text()), figures)
        click.echo(f"\nchange against {previous}:")
        for key, old, new, pct in rows:
            change = "n/a" if pct is None else f"{pct:+.1f} %"
            click.echo(f"  {key:<60} {old:>12.4g} -> {new:<12.4g} {change}")


def _command(run: Path, data: Path, views: tuple[str, ...], stage_cases: int, sizes: str,
             engines: str, ledger_lines: str, windows: str) -> str:  # fmt: skip
    """The command line that reproduces these figures, every option spelled out."""
    parts = ["qcloop", "bench", "loop", "--run", str(run), "--data", str(data)]
    for v in views:
        parts += ["--view", v]
    parts += ["--stage-cases", str(stage_cases), "--sizes", sizes, "--engines", engines,
              "--ledger-lines", ledger_lines, "--windows", windows]  # fmt: skip
    return " ".join(shlex.quote(p) for p in parts)


def loop_table(f: dict[str, Any]) -> str:
    """The figures as the text the command prints."""
    lines = [
        f"$ {f['command']}",
        f"load average {f['load_before']} -> {f['load_after']}, {f['cpus']} CPUs",
        "",
    ]
    for view, s in f["stages"].items():
        lines.append(
            f"{view}: median ms per case over {s['cases']} cases, {s['candidates']} candidates"
        )
        for stage, ms in s["median_ms"].items():
            per = (
                " (per candidate)" if stage in ("segment", "reconstruct", "pseudo_metrics") else ""
            )
            lines.append(f"  {stage:<16}{ms:>9.2f}{per}")
        ratio = s["qc_over_segmentation"]
        verdict = "within" if ratio is not None and ratio <= s["qc_target"] else "OVER"
        lines.append(
            f"  QC / segmentation of one candidate: {ratio} ({verdict} the {s['qc_target']:.0%} target)"
        )
        for arch, ref_ms in s.get("reference_segment_ms", {}).items():
            r = s["qc_over_reference"][arch]
            verdict = "within" if r <= s["qc_target"] else "OVER"
            lines.append(
                f"  QC / {arch} at its reference size ({ref_ms} ms per case): {r} ({verdict} the target)"
            )
        if s.get("estimate_over_scoring") is not None:
            e = s["estimate_over_scoring"]
            verdict = "within" if e <= s["estimate_target"] else "OVER"
            what = (
                "signals + calibrator" if s.get("estimator") else "signals (run has no estimator)"
            )
            lines.append(
                f"  estimate ({what}) / scoring of the case: {e} "
                f"({verdict} the {s['estimate_target']:.0%} target)"
            )
    t = f["throughput"]
    if t["rows"]:
        lines += [
            "",
            f"throughput ({t['view']}): engine, cases, cases/s, ms/case, driver peak RSS MiB, "
            "Ray start-up s (not in cases/s)",
        ]
        for r in t["rows"]:
            lines.append(
                f"  {r['engine']:<6} {r['size']:>7} {r['cases_per_s']:>8.2f} {r['ms_per_case']:>8.1f} {r['peak_rss_mib']:>8.1f} {r['startup_s']:>6.1f}"
            )
        for engine, lin in t["linearity"].items():
            lines.append(
                f"  {engine}: ms/case x{lin['ms_per_case_ratio']} and peak RSS "
                f"{lin['peak_rss_growth_mib']:+.1f} MiB from {lin['sizes'][0]} to {lin['sizes'][1]} cases; "
                f"each further case {lin['marginal_ms_per_case']} ms"
            )
    if f["ledger_restart"]:
        r = f["ledger_restart"]
        lines += [
            "",
            f"monitor restart: {r['lines']} ledger lines ({r['state_mib']} MiB of state) "
            f"reopened in {r['seconds']:.2f} s ({r['us_per_line']} us/line), peak RSS {r['peak_rss_mib']} MiB",
        ]
    if f["refinement"]:
        lines += [
            "",
            f"refinement ({f['refinement']['view']}): window, seconds, candidate epochs, s/epoch",
        ]
        for r in f["refinement"]["rows"]:
            lines.append(
                f"  {r['window']:>6} {r['seconds']:>8.2f} {r['candidate_epochs']:>6} {r['s_per_epoch']:>8.3f}"
            )
    return "\n".join(lines)
