"""``qcloop config``: print the JSON Schema, validate a file, show the effective configuration."""

from __future__ import annotations

import json

import click

from qcloop.monitor.core.config import (
    ConfigError,
    check_components,
    config_schema,
    dump_config,
    load_config,
)


def _report(source: str, problems: list[str], *, err: bool = False) -> None:
    count = len(problems)
    click.echo(f"{source}: {count} problem{'s' if count != 1 else ''}", err=err)
    for problem in problems:
        click.echo(f"  {problem}", err=err)


@click.group("config")
def config() -> None:
    """Inspect and validate qcloop configuration files."""


@config.command("schema")
def schema() -> None:
    """Print the JSON Schema of a configuration file."""
    click.echo(json.dumps(config_schema(), indent=2))


@config.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
def validate(file: str) -> None:
    """Check FILE, including its component names against the installed plugins."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    try:
        cfg = load_config(file)
    except ConfigError as exc:
        _report(file, exc.problems)
        raise click.exceptions.Exit(1) from None
    problems = check_components(cfg, get_plugin_manager())
    if problems:
        _report(file, problems)
        raise click.exceptions.Exit(1) from None
    click.echo(f"{file}: valid")


@config.command("show")
@click.argument("file", type=click.Path(dir_okay=False), required=False)
def show(file: str | None) -> None:
    """Print the effective configuration of FILE (the built-in default without FILE) as YAML."""
    try:
        cfg = load_config(file)
    except ConfigError as exc:
        _report(exc.source, exc.problems, err=True)
        raise click.exceptions.Exit(1) from None
    click.echo(dump_config(cfg), nl=False)
