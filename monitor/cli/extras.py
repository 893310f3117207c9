"""The optional extras a command needs, checked when it runs (before any heavy import)."""

from __future__ import annotations

import click

from qcloop.monitor.core.optional import MissingExtraError, require

__all__ = ["need"]


def need(command: str, extra: str, *modules: str) -> None:
    """Fail ``command`` with a usage error naming ``extra`` unless every module imports."""
    for module in modules:
        try:
            require(module, extra, command)
        except MissingExtraError as exc:
            raise click.ClickException(str(exc)) from None
