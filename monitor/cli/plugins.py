"""``qcloop plugins``: the installed plugins, the hooks they implement and their components."""

from __future__ import annotations

import json
from typing import Any

import click

from qcloop.monitor import __version__
from qcloop.monitor.core.plugin_manager import (
    DEFAULT_PLUGINS,
    QcloopPluginManager,
    get_plugin_manager,
)


def plugin_summaries(pm: QcloopPluginManager, *, include_builtins: bool) -> list[dict[str, Any]]:
    """One JSON-serialisable summary per registered plugin, built-ins first."""
    components = pm.components_by_plugin()
    names = [name for name in components if name]
    builtins = [name for name in DEFAULT_PLUGINS if name in names] if include_builtins else []
    others = sorted(name for name in names if not pm.is_builtin(name))
    summaries = []
    for name in builtins + others:
        builtin = pm.is_builtin(name)
        dist, version = pm.distributions.get(name, ("qcloop", __version__) if builtin else ("", ""))
        summaries.append(
            {
                "name": name,
                "builtin": builtin,
                "distribution": dist or None,
                "version": version or None,
                "hooks": pm.hooks_of(name),
                "components": {kind: sorted(found) for kind, found in components[name].items()},
            }
        )
    return summaries


def _format_table(summaries: list[dict[str, Any]]) -> str:
    header = ("PLUGIN", "SOURCE", "HOOKS", "COMPONENTS")
    rows = [header]
    for summary in summaries:
        if summary["builtin"]:
            source = "built-in"
        elif summary["distribution"]:
            source = f"{summary['distribution']} {summary['version'] or ''}".strip()
        else:
            source = "registered in process"
        components = "; ".join(
            f"{kind}: {', '.join(names)}" for kind, names in summary["components"].items()
        )
        rows.append(
            (summary["name"], source, ", ".join(summary["hooks"]) or "-", components or "-")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
        + "  "
        + row[-1]
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


@click.command("plugins")
@click.option("--all", "include_builtins", is_flag=True, help="Include the built-in plugins.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(include_builtins: bool, as_json: bool) -> None:
    """List installed plugins, the hooks they implement and the components they register."""
    summaries = plugin_summaries(get_plugin_manager(), include_builtins=include_builtins)
    if as_json:
        click.echo(json.dumps(summaries, indent=2))
    elif not summaries:
        click.echo("No third-party plugins installed (--all also lists the built-ins).")
    else:
        click.echo(_format_table(summaries))
