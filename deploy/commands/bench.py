"""``qcloop bench inference`` and ``qcloop bench serve``: the deploy plugin's benchmarks, added
to the ``qcloop bench`` group beside the core's ``metrics``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from qcloop.deploy.commands.serve import registered_runtime
from qcloop.monitor.cli.extras import need

__all__ = ["inference", "inference_table", "serve_benchmark", "serve_table"]


def _int_list(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    """A click callback: comma-separated positive integers."""
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not items or any(v < 1 for v in items):
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return items


def _name_list(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    """A click callback: comma-separated names, at least one."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter("expected at least one name")
    return items


@click.command("inference")
@click.option(
    "--sizes", default="128,256", show_default=True, callback=_int_list, help="Input sizes (px)."
)
@click.option(
    "--batches", default="1,16", show_default=True, callback=_int_list, help="Batch sizes."
)
@click.option(
    "--archs",
    default="bn1,bn2",
    show_default=True,
    callback=_name_list,
    help="Registered segmenters, built with their default (reference) parameters.",
)
@click.option(
    "--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed calls."
)
@click.option(
    "--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed calls."
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads for both backends (default: torch's).",
)
@click.option(
    "--sgemm-size",
    type=click.IntRange(min=64),
    default=2048,
    show_default=True,
    help="Side of the square matrices of the fp32 matmul reference.",
)
@click.option(
    "--exporter",
    type=click.Choice(["dynamo", "torchscript"]),
    default="dynamo",
    show_default=True,
    help="torch.onnx exporter of the benchmarked graphs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def inference(
    sizes: list[int],
    batches: list[int],
    archs: list[str],
    repeats: int,
    warmup: int,
    threads: int | None,
    sgemm_size: int,
    exporter: str,
    as_json: bool,
) -> None:
    """Slices per second of the segmenters: PyTorch eager vs ONNX Runtime CPU, same run."""
    need("qcloop bench inference", "onnx", "onnx", "onnxruntime")
    from qcloop.deploy.benchmarks.inference import run_inference_benchmark
    from qcloop.monitor.core.plugin_manager import UnknownComponentError

    try:
        figures = run_inference_benchmark(
            sizes=sizes,
            batches=batches,
            archs=archs,
            repeats=repeats,
            warmup=warmup,
            threads=threads,
            sgemm_size=sgemm_size,
            exporter=exporter,
            progress=lambda line: click.echo(line, err=True),
        )
    except (UnknownComponentError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(figures, indent=2, allow_nan=False))
        return
    click.echo(inference_table(figures))


def inference_table(figures: dict[str, Any]) -> str:
    """The inference benchmark figures as a Markdown table with PASS/MISS per target."""
    sgemm = figures["sgemm_gflops"]
    machine = figures["machine"]
    load_b = figures["load_average_before"]
    load_a = figures["load_average_after"]
    lines = [
        f"inference benchmark {figures['date']}: {machine['cpu']}, {machine['cpus_usable']} "
        f"usable CPUs, {figures['threads']} threads, repeats={figures['settings']['repeats']}, "
        f"exporter {figures['settings']['exporter']}",
        f"load average (1/5/15 min) before {load_b[0]}/{load_b[1]}/{load_b[2]}, after "
        f"{load_a[0]}/{load_a[1]}/{load_a[2]}",
        f"fp32 sgemm (torch.matmul {figures['settings']['sgemm_size']}^2): "
        f"{sgemm['before']:.1f} GFLOP/s before, {sgemm['after']:.1f} after; reference "
        f"{sgemm['reference']:.1f}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in figures["versions"].items()),
        "",
        "| arch | size | batch | GFLOP/slice | torch slices/s | ORT slices/s | ORT/torch "
        "| target | torch GFLOP/s | ORT GFLOP/s | ORT/sgemm | ratio | GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in figures["rows"]:
        target = f"{r['ratio_target']:.1f}x" if r["ratio_target"] is not None else "-"
        lines.append(
            f"| {r['arch']} | {r['size']} | {r['batch']} | {r['gflop_per_slice']:.2f} "
            f"| {r['torch_slices_per_s']:.2f} | {r['ort_slices_per_s']:.2f} | {r['ratio']:.2f}x "
            f"| {target} | {r['torch_gflops']:.1f} | {r['ort_gflops']:.1f} "
            f"| {100 * r['ort_sgemm_fraction']:.0f} % | {r['ratio_status'] or '-'} "
            f"| {r['gflops_status']} |"
        )
    rows = figures["rows"]
    ratio_rows = [r for r in rows if r["ratio_status"] is not None]
    lines.append("")
    lines.append(
        f"targets: ORT/torch >= {figures['targets']['ratio_batch_1']}x at batch 1 and >= "
        f"{figures['targets']['ratio_batch_16']}x at batch 16; ORT GFLOP/s >= "
        f"{100 * figures['targets']['sgemm_fraction']:.0f} % of sgemm"
    )
    passed = sum(r["ratio_status"] == "PASS" for r in ratio_rows)
    lines.append(f"ratio targets: {passed}/{len(ratio_rows)} PASS")
    passed = sum(r["gflops_status"] == "PASS" for r in rows)
    lines.append(f"GFLOP/s target: {passed}/{len(rows)} PASS")
    lines.append(f"elapsed: {figures['elapsed_s']:.0f} s")
    return "\n".join(lines)


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
    "--concurrency",
    default="1,8",
    show_default=True,
    callback=_int_list,
    help="Comma-separated client threads.",
)
@click.option(
    "--runtime",
    default=None,
    metavar="NAME",
    callback=registered_runtime,
    help="Server runtime, a registered one (default: onnxruntime when RUN/onnx holds an "
    "export, else torch).",
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
def serve_benchmark(
    run_dir: Path,
    n_requests: int,
    concurrency: list[int],
    runtime: str | None,
    data: Path | None,
    config_path: Path | None,
    as_json: bool,
) -> None:
    """Latency p50/p99, throughput, errors and peak RSS of `qcloop serve` on one SA volume."""
    need("qcloop bench serve", "serve", "fastapi", "uvicorn", "httpx")
    from qcloop.deploy.benchmarks.serve import run_serve_benchmark

    try:
        figures = run_serve_benchmark(
            run_dir,
            requests=n_requests,
            concurrency=concurrency,
            runtime=runtime,
            data=data,
            config=config_path,
        )
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(figures, indent=2, allow_nan=False))
        return
    click.echo(serve_table(figures))


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def serve_table(figures: dict[str, Any]) -> str:
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
