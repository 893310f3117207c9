"""``qcloop bench serve``: latency, throughput, errors and peak memory of ``qcloop serve``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return levels


@click.command("serve")
@click.option(
    "--run",
    "run_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    required=True,
    help="Trained run folder to serve.",
)
@click.option(
    "--requests",
    "n_requests",
    type=click.IntRange(min=1),
    default=40,
    show_default=True,
    help="Timed requests per concurrency level.",
)
@click.option(
    "--concurrency", default="1,8", show_default=True, help="Comma-separated client threads."
)
@click.option(
    "--runtime",
    type=click.Choice(["torch", "onnxruntime"]),
    default=None,
    help="Server runtime (default: onnxruntime when RUN/onnx holds an export, else torch).",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Send the first *_SA_ED.nii.gz of this dataset instead of a 10-slice phantom.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Configuration for the server's serving section (concurrency, queue, limits).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def serve(
    run_dir: Path,
    n_requests: int,
    concurrency: str,
    runtime: str | None,
    data: Path | None,
    config_path: Path | None,
    as_json: bool,
) -> None:
    """Latency p50/p99, throughput, errors and peak RSS of `qcloop serve` on one SA volume."""
    from qcloop.monitor.benchmarks.serve import run_serve_benchmark

    try:
        figures = run_serve_benchmark(
            run_dir,
            requests=n_requests,
            concurrency=_levels(concurrency),
            runtime=runtime,
            data=data,
            config=config_path,
        )
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(figures, indent=2, allow_nan=False))
        return
    click.echo(_table(figures))


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(figures: dict[str, Any]) -> str:
    """The figures as a small text table."""
    vol = figures["volume"]
    lines = [
        f"serve benchmark: run={figures['run']} runtime={figures['runtime']} "
        f"providers={figures['providers']}",
        f"volume: {vol['source']} shape={'x'.join(str(n) for n in vol['shape'])} "
        f"({vol['bytes'] / 1024:.0f} KiB); cpus={figures['cpu_count']} "
        f"load(1 min)={figures['load_average_1min_before']:.2f}->"
        f"{figures['load_average_1min_after']:.2f}",
        "",
        f"{'clients':>8}{'requests':>10}{'errors':>8}{'429':>6}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'mean ms':>10}{'req/s':>8}",
    ]
    for lv in figures["levels"]:
        lines.append(
            f"{lv['concurrency']:>8}{lv['requests']:>10}{lv['errors']:>8}{lv['rejected_429']:>6}"
            f"{_fmt(lv['p50_ms'], '.1f'):>10}{_fmt(lv['p99_ms'], '.1f'):>10}"
            f"{_fmt(lv['mean_ms'], '.1f'):>10}{lv['throughput_rps']:>8.2f}"
        )
    server = figures["server"]
    lines.append("")
    lines.append(
        f"server: ready after {server['ready_s']:.1f} s; RSS {server['rss_mb']:.0f} MiB, "
        f"peak {server['peak_rss_mb']:.0f} MiB (VmHWM)"
    )
    lines.extend(f"- {note}" for note in figures["notes"])
    return "\n".join(lines)
