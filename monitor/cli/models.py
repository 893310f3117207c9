"""``qcloop models list | register | promote | rollback``: registered model versions, through
the configured model-registry plugin (MLflow by default)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.interfaces import ModelRegistry

_uri = click.option(
    "--tracking-uri",
    default=None,
    help="Where the registry lives (MLflow: a tracking URI; default: registry.uri, else "
    "MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db).",
)
_config = click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML configuration whose registry section (backend, uri) applies.",
)
_json = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")

#: Tags shown in the table (the rest is in --json).
KEY_TAGS = (
    ("qcloop.kind", "kind"),
    ("qcloop.parent_version", "parent"),
    ("qcloop.window_ood", "window OoD"),
    ("qcloop.window_cases", "window cases"),
)


@contextlib.contextmanager
def registry_errors() -> Iterator[None]:
    """Bad specs, models and versions, an unreachable store and a missing extra as one-line
    command errors."""
    from qcloop.monitor.core.optional import MissingExtraError
    from qcloop.monitor.ops.run_package import RegistryUnavailableError

    try:
        yield
    except (ValueError, RegistryUnavailableError, MissingExtraError) as exc:
        raise click.ClickException(str(exc)) from exc


def open_registry(tracking_uri: str | None, config_file: Path | None = None) -> ModelRegistry:
    """The configured model registry (``registry.backend``, default MLflow) at
    ``tracking_uri`` (default ``registry.uri``, else the backend's default)."""
    from qcloop.monitor.core.config import load_config
    from qcloop.monitor.core.plugin_manager import apply_plugin_settings
    from qcloop.monitor.core.resolve import build_model_registry

    cfg = load_config(config_file)
    apply_plugin_settings(cfg)
    return build_model_registry(cfg, uri=tracking_uri)


@click.group()
def models() -> None:
    """Registered model versions (one model per view, PREFIX-SA / PREFIX-LA) and their aliases
    champion / challenger, in the configured model registry (MLflow by default)."""


def _gate_text(row: dict[str, Any]) -> str:
    gate = row.get("gate")
    if not gate:
        return "-"
    return "passed" if gate.get("passed") else "failed"


@models.command("list")
@click.option("--prefix", default=None, help="Only models named PREFIX-SA / PREFIX-LA.")
@_uri
@_config
@_json
def list_cmd(
    prefix: str | None, tracking_uri: str | None, config_file: Path | None, as_json: bool
) -> None:
    """Every version, newest first: aliases, lineage tags and the gate's result."""
    with registry_errors():
        rows = open_registry(tracking_uri, config_file).list_versions(prefix)
    if as_json:
        click.echo(json.dumps(rows, indent=2, allow_nan=False))
        return
    if not rows:
        click.echo("no registered qcloop model versions")
        return
    header = ["name", "version", "aliases", *(label for _, label in KEY_TAGS), "gate"]
    table = [
        [
            r["name"],
            r["version"],
            ",".join(r["aliases"]) or "-",
            *(r["tags"].get(tag, "-") for tag, _ in KEY_TAGS),
            _gate_text(r),
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=False)]
    for line in [header, *table]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
    for r in rows:
        gate = r.get("gate")
        if gate and gate.get("reasons"):
            for reason in gate["reasons"]:
                click.echo(f"{r['name']}/{r['version']}: {reason}")


@models.command("register")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prefix", default="qcloop", show_default=True, help="Models PREFIX-<VIEW>.")
@click.option(
    "--alias",
    type=click.Choice(["challenger", "champion", "none"]),
    default="challenger",
    show_default=True,
    help="Alias given to the new versions (set after they are complete).",
)
@_uri
@_config
@_json
def register_cmd(
    run_dir: Path,
    prefix: str,
    alias: str,
    tracking_uri: str | None,
    config_file: Path | None,
    as_json: bool,
) -> None:
    """Register every view of RUN_DIR as a new version of PREFIX-<VIEW>."""
    from qcloop.monitor.ops.promotion import register

    with registry_errors():
        refs = register(
            open_registry(tracking_uri, config_file),
            run_dir,
            name_prefix=prefix,
            alias=None if alias == "none" else alias,
        )
    if as_json:
        click.echo(json.dumps({v: r.to_dict() for v, r in refs.items()}, indent=2))
        return
    for ref in refs.values():
        click.echo(f"{ref.name} version {ref.version} ({', '.join(ref.aliases) or 'no alias'})")


@models.command("promote")
@click.argument("name")
@click.argument("version")
@click.option("--alias", default="champion", show_default=True, help="Alias to move.")
@click.option("--force", is_flag=True, help="Promote even a version whose gate failed.")
@_uri
@_config
@_json
def promote_cmd(
    name: str,
    version: str,
    alias: str,
    force: bool,
    tracking_uri: str | None,
    config_file: Path | None,
    as_json: bool,
) -> None:
    """Move ALIAS of model NAME to VERSION (refused when the version's gate failed)."""
    from qcloop.monitor.ops.promotion import TAG_GATE_PASSED, promote

    with registry_errors():
        registry = open_registry(tracking_uri, config_file)
        row = registry.get_version(name, version)
        if row["tags"].get(TAG_GATE_PASSED) == "false" and not force:
            reasons = "; ".join((row.get("gate") or {}).get("reasons", []))
            raise click.ClickException(
                f"{name} version {version} failed the promotion gate ({reasons}); "
                "use --force to promote it anyway"
            )
        ref = promote(registry, name, version, alias=alias).ref
    if as_json:
        click.echo(json.dumps(ref.to_dict(), indent=2))
    else:
        click.echo(f"{ref.name}: {alias} is now version {ref.version}")


@models.command("rollback")
@click.argument("name")
@_uri
@_config
@_json
def rollback_cmd(
    name: str, tracking_uri: str | None, config_file: Path | None, as_json: bool
) -> None:
    """Move the champion of model NAME back to the version it replaced."""
    from qcloop.monitor.ops.promotion import rollback

    with registry_errors():
        ref = rollback(open_registry(tracking_uri, config_file), name).ref
    if as_json:
        click.echo(json.dumps(ref.to_dict(), indent=2))
    else:
        click.echo(f"{ref.name}: champion rolled back to version {ref.version}")
