"""``qcloop demo``: the paper's ablation on built-in phantom cohorts."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--quick", is_flag=True, help="Small cohort and short training (a few minutes).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("qcloop-demo"),
    show_default=True,
    help="Output folder.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=None, help="Processes for phantom generation.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="YAML settings laid over the demo's configuration (e.g. another option to compare).",
)
def demo(
    quick: bool, out_dir: Path, seed: int, workers: int | None, config_path: Path | None
) -> None:
    """Generate phantoms, train M and R on vendor A, and run the M / M+QC / full ablation.

    Writes OUT/ablation.json, OUT/ablation.md, the model set in OUT/run (usable by assess,
    refine and predict), the refined set in OUT/run-refined and the cohort in OUT/data.
    --config changes single settings of the demo's configuration (OUT/config.yaml holds the
    result), so one option of the method can be compared against the default table.
    """
    from qcloop.monitor.cli.demo_run import demo_config, run_demo
    from qcloop.monitor.core.config import ConfigError, override_config

    config = None
    if config_path is not None:
        try:
            config = override_config(demo_config(quick, seed), config_path)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    command = " ".join(
        ["qcloop demo", *(["--quick"] if quick else []), "--out", str(out_dir)]
        + (["--seed", str(seed)] if seed else [])
        + (["--config", str(config_path)] if config_path is not None else [])
    )
    result = run_demo(
        out_dir, quick=quick, seed=seed, workers=workers, config=config, command=command
    )
    click.echo((out_dir / "ablation.md").read_text())
    click.echo(f"demo finished in {result['meta']['seconds']:.0f} s; results in {out_dir}")
    _report(out_dir)


def _report(out_dir: Path) -> None:
    """The demo's report page (qcloop report), where matplotlib is installed."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        click.echo("no report page: matplotlib is not installed (pip install 'qcloop[report]')")
        return
    from qcloop.monitor.report.page import write_report

    info = write_report(out_dir, out_dir / "report.html")
    click.echo(f"report: {info['path']}")
