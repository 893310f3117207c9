"""``qcloop bench``: benchmarks that print figures.

The core's benchmark is ``metrics``; plugins add theirs to this group from their
``register_commands`` hook (the deploy plugin adds ``inference`` and ``serve``)."""

from __future__ import annotations

import json
import os
from typing import Any

import click


class BenchGroup(click.Group):
    """The ``bench`` group: the benchmarks plugins add arrive with the root group's plugin
    commands, loaded before this group lists or looks up its own."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        _load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        _load_plugin_commands()
        return super().get_command(ctx, cmd_name)


def _load_plugin_commands() -> None:
    from qcloop.monitor.cli.main import cli

    cli.load_plugin_commands()


@click.group(cls=BenchGroup)
def bench() -> None:
    """Benchmarks that print figures (timings and agreement with reference libraries)."""


@bench.command("metrics")
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Timed calls per method and mask pair.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Phantom generator seed.")
@click.option(
    "--torch-threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads for torch (MONAI's path); torch's default when left out.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def metrics(repeats: int, seed: int, torch_threads: int | None, as_json: bool) -> None:
    """Dice/HD/HD95: qcloop vs MONAI vs a whole-image scipy version, on heart-like masks."""
    from qcloop.monitor.benchmarks.metrics import run_metrics_benchmark

    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)

    figures = run_metrics_benchmark(repeats=repeats, seed=seed)
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    click.echo(_metrics_table(figures))


@bench.command("inbox")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--data", required=True, type=click.Path(exists=True, file_okay=False),
    help="Dataset folder lending the good SA cases.",
)  # fmt: skip
@click.option("--cases", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--bomb-mib", type=click.IntRange(min=1), default=2048, show_default=True,
    help="MiB of zeros behind the plausible header of the second gzip bomb.",
)  # fmt: skip
def inbox(run_dir: str, data: str, cases: int, bomb_mib: int) -> None:
    """Peak RSS and time of one monitor pass: good cases alone, then among hostile files."""
    from pathlib import Path

    from qcloop.monitor.benchmarks.inbox import run_inbox_benchmark

    figures = run_inbox_benchmark(Path(run_dir), Path(data), cases=cases, bomb_mib=bomb_mib)
    size = figures["hostile_inbox_bytes"] / 2**20
    click.echo(
        f"inbox benchmark: {figures['cases']} good SA case(s); hostile inbox "
        f"{size:.1f} MiB on disk, deep bomb inflating to {figures['bomb_mib']} MiB; "
        f"cpus={os.cpu_count()}"
    )
    click.echo(f"{'pass':<10}{'peak RSS MiB':>14}{'seconds':>10}{'scored':>8}{'rejected':>10}")
    for name in ("good", "hostile"):
        f = figures[name]
        click.echo(
            f"{name:<10}{f['peak_rss_mib']:>14.0f}{f['seconds']:>10.1f}{f['case']:>8}"
            f"{f['rejected']:>10}"
        )
    click.echo("hostile files: " + ", ".join(figures["hostile_files"]))


@bench.command("report")
@click.option(
    "--cases",
    "sizes",
    type=click.IntRange(min=1),
    multiple=True,
    default=(1_000, 10_000),
    show_default=True,
    help="Record counts to build pages for (repeat the option).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def report(sizes: tuple[int, ...], as_json: bool) -> None:
    """Size and build time of qcloop report pages for growing numbers of cases (synthetic
    assess outputs: ground truth, fences, a figure per flagged case, a mask per case)."""
    from qcloop.monitor.benchmarks.report import run_report_benchmark

    figures = run_report_benchmark(tuple(sizes))
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    click.echo(f"{'cases':>8}{'MB':>8}{'seconds':>9}{'bytes/case':>12}")
    for f in figures:
        click.echo(
            f"{f['cases']:>8}{f['bytes'] / 1e6:>8.2f}{f['seconds']:>9.2f}{f['bytes_per_case']:>12.0f}"
        )


@bench.command("drift")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--evaluations",
    type=click.Path(exists=True, dir_okay=False),
    help="A demo's evaluations.jsonl (scored test cases with their OoD flags): streams are "
    "drawn from its cases with replacement.",
)
@click.option(
    "--fresh",
    type=click.IntRange(min=10),
    default=None,
    help="Instead: generate this many new vendor-A test subjects (2 cases per view each) and "
    "score them with the run; each case enters the in-distribution stream once.",
)
@click.option(
    "--fresh-shifted",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="With --fresh: new subjects of each of vendors B and C, for the cases to alert.",
)
@click.option(
    "--fresh-grid",
    type=click.Choice(["default", "small", "tiny"]),
    default="default",
    show_default=True,
    help="With --fresh: the phantom preset whose image grid the new cases "
    "take (that of the run's training data).",
)
@click.option(
    "--work", type=click.Path(file_okay=False), default=None,
    help="With --fresh: keep the generated cohort here (default: a temporary folder).",
)  # fmt: skip
@click.option("--reference-vendor", default="A", show_default=True)
@click.option("--draws", type=click.IntRange(min=1000), default=100_000, show_default=True)
@click.option("--repeats", type=click.IntRange(min=10), default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--alpha", type=click.FloatRange(0.0, 0.5, min_open=True, max_open=True), default=None,
    help="alert_alpha of the binomial rule (default: the run's monitoring.alert_alpha).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def drift(
    run_dir: str, evaluations: str | None, fresh: int | None, fresh_shifted: int,
    fresh_grid: str, work: str | None, reference_vendor: str, draws: int, repeats: int, seed: int,
    alpha: float | None, as_json: bool,
) -> None:  # fmt: skip
    """False alarms per 1000 in-distribution cases and cases to alert on a shifted vendor,
    for the fixed and the binomial drift rule, from a demo's scored cases (--evaluations) or
    from a freshly generated cohort (--fresh N)."""
    from pathlib import Path

    from qcloop.monitor.benchmarks.drift import run_drift_benchmark

    if (evaluations is None) == (fresh is None):
        raise click.UsageError("give exactly one of --evaluations FILE or --fresh N")
    pools = None
    if fresh is not None:
        from qcloop.monitor.benchmarks.fresh_cohort import fresh_pools

        pools = fresh_pools(
            Path(run_dir), fresh, fresh_shifted, seed=seed, grid_of=fresh_grid,
            work=Path(work) if work else None,
        )  # fmt: skip
    figures = run_drift_benchmark(
        Path(run_dir), Path(evaluations) if evaluations else None,
        reference_vendor=reference_vendor, draws=draws, repeats=repeats, seed=seed,
        alpha=alpha, fresh=pools,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    click.echo(_drift_table(figures))


def _drift_table(figures: dict[str, Any]) -> str:
    """The drift benchmark figures as text."""
    s = figures["settings"]
    source = "fresh cases, each once" if s.get("fresh") else f"{s['draws']} draws with replacement"
    lines = [
        f"drift benchmark: window {s['window']}, alert_alpha {s['alert_alpha']:g}, "
        f"in-distribution: vendor {s['reference_vendor']}, {source}; {s['repeats']} shifted "
        "streams per vendor"
    ]
    for view, v in figures["views"].items():
        lines.append(
            f"{view}: vendor {s['reference_vendor']} test flag rate "
            f"{v['in_distribution_flag_rate']:.3f} over {v['in_distribution_cases']} cases "
            f"(pools {v['pool_sizes']}); reference flags "
            f"(leave-one-out) {v['reference_flags']}; reference median {v['reference_median']}"
        )
        for rule in ("fixed", "binomial"):
            for key, value in v[rule].items():
                lines.append(f"  {rule:<9}{key:<44}{value}")
    return "\n".join(lines)


def _metrics_table(figures: dict[str, Any]) -> str:
    """The metrics benchmark figures as a small text table."""
    lines = [
        f"metrics benchmark: repeats={figures['repeats']} seed={figures['seed']} "
        f"torch threads={figures['torch_threads']} cpus={figures['cpu_count']} "
        f"load(1 min)={figures['load_average_1min']}",
        "",
        f"{'case':<20}{'qcloop ms':>11}{'monai ms':>11}{'scipy ms':>11}"
        f"{'x monai':>9}{'x scipy':>9}{'|d| HD':>10}{'|d| HD95':>10}",
    ]
    for kind, result in figures["results"].items():
        shape = "x".join(str(n) for n in result["shape"])
        median = result["median_ms"]
        diff = result["max_abs_diff_mm"]
        lines.append(
            f"{kind + ' ' + shape:<20}{median['qcloop']:>11.2f}{median['monai']:>11.2f}"
            f"{median['scipy_whole_image']:>11.2f}{result['speedup_vs_monai']:>9.1f}"
            f"{result['speedup_vs_scipy_whole_image']:>9.1f}"
            f"{diff['qcloop_vs_monai_hd']:>10.1e}{diff['qcloop_vs_monai_hd95']:>10.1e}"
        )
    lines.append("")
    lines.append("median ms per mask pair; |d|: max |qcloop - MONAI| in mm over all structures.")
    lines.extend(f"- {note}" for note in figures["notes"])
    return "\n".join(lines)


@bench.command("qc-modules")
@click.option("--size", type=click.IntRange(min=16), default=128, show_default=True,
              help="Slice side in pixels (4 * 2**k).")  # fmt: skip
@click.option("--slices", type=click.IntRange(min=1), default=12, show_default=True,
              help="Slices per case.")  # fmt: skip
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--width-scale", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="Factor on every module's default widths.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def qc_modules(size: int, slices: int, repeats: int, width_scale: float, as_json: bool) -> None:
    """Per-case reconstruction cost of every registered QC module, and its ratio to the mask
    autoencoder (one run, interleaved timings, untrained weights)."""
    from qcloop.monitor.benchmarks.qc_modules import qc_module_table, run_qc_module_benchmark

    figures = run_qc_module_benchmark(
        size=size, slices=slices, repeats=repeats, width_scale=width_scale
    )
    click.echo(json.dumps(figures, indent=2) if as_json else qc_module_table(figures))


def _add_loop() -> None:
    from qcloop.monitor.cli.bench_loop import loop

    bench.add_command(loop)


_add_loop()
