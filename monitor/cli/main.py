"""The ``qcloop`` command line: one entry point, subcommands loaded lazily.

The core's own commands are listed in :data:`BUILTIN_COMMANDS`; plugins add theirs through the
``register_commands`` hook (the deploy plugin adds ``serve``, ``export-onnx``, ``export-triton``
and the ``bench inference`` / ``bench serve`` benchmarks). Heavy libraries (torch, mlflow,
monai) are imported by the commands that need them, never by ``qcloop --help``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

import click

from qcloop.monitor import __version__

#: Built-in subcommands: name -> "module:attribute" under ``qcloop.monitor.cli``.
BUILTIN_COMMANDS: dict[str, str] = {
    "phantoms": "phantoms:phantoms",
    "phantoms-gallery": "phantoms:gallery",
    "data": "data:data",
    "plugins": "plugins:plugins",
    "config": "config:config",
    "bench": "bench:bench",
    "train": "loop:train",
    "assess": "loop:assess",
    "refine": "loop:refine",
    "predict": "loop:predict",
    "demo": "demo:demo",
    "monitor": "monitor:monitor",
    "models": "models:models",
    "qc": "qc:qc",
    "calibrate": "calibrate:calibrate",
    "fit-estimator": "estimate:fit_estimator_command",
    "evaluate-qc": "estimate:evaluate_qc",
    "report": "report:report",
    "feedback": "feedback:feedback",
}


class LazyGroup(click.Group):
    """A click group whose built-in subcommands are imported on first use."""

    def __init__(
        self,
        *args,
        lazy: dict[str, str] | None = None,
        plugin_commands: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy or {})
        # only the top-level group offers plugins the register_commands hook
        self._plugins_loaded = not plugin_commands

    def load_plugin_commands(self) -> None:
        """Let plugins add their commands (once; only on the group made with
        ``plugin_commands=True``)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from qcloop.monitor.core.plugin_manager import get_plugin_manager

        get_plugin_manager().add_commands(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_plugin_commands()
        available = [name for name in self._lazy if _module_exists(self._lazy[name].split(":")[0])]
        return sorted(set(available) | set(super().list_commands(ctx)))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            module_name, attr = self._lazy[cmd_name].split(":")
            if _module_exists(module_name):
                module = importlib.import_module(f"qcloop.monitor.cli.{module_name}")
                return getattr(module, attr)
        self.load_plugin_commands()
        return super().get_command(ctx, cmd_name)


def _module_exists(module_name: str) -> bool:
    return importlib.util.find_spec(f"qcloop.monitor.cli.{module_name}") is not None


@click.group(
    cls=LazyGroup, lazy=BUILTIN_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(__version__, prog_name="qcloop")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Verbosity of log messages (written to stderr).",
)
def cli(log_level: str) -> None:
    """qcloop: quality control, OoD detection and refinement for cardiac segmenters."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="qcloop")


if __name__ == "__main__":  # pragma: no cover
    main()
