"""The deploy plugin: the ``onnxruntime`` runtime (models exported by ``qcloop export-onnx``), the
``ray`` engine of assess and predict, the ``onnx`` model kind of model cards, and the commands ``serve``, ``export-onnx``,
``export-triton``, ``bench inference`` and ``bench serve``.

Loaded by name like any plugin (``qcloop.deploy.plugin`` in the built-in list), and blocked like
any (``QCLOOP_BLOCK_PLUGINS=qcloop.deploy.plugin``: no runtime, no model kind, no commands).
Importing it needs none of the optional extras: the runtime, the model kind and each command
check theirs (``onnx``, ``serve``, ``triton``, ``ray``) when used, and say which to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcloop.monitor import hookimpl
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.hookspecs import Register
from qcloop.monitor.core.model_card import ModelCard

if TYPE_CHECKING:  # pragma: no cover
    import click

#: The ``qcloop`` group the benchmarks join (a core command, beside its ``metrics``).
BENCH_GROUP = "bench"


def onnxruntime_runtime(run_dir: Path, view: str, cfg: QcloopConfig, **params: Any) -> Any:
    """The ``onnxruntime`` runtime of ``view`` (parameters: ``onnx_dir``, ``threads``,
    ``providers``, ``batch_size``; see :func:`qcloop.deploy.onnx.runtime.runtime_for_run`)."""
    from qcloop.monitor.core.optional import require

    require("onnxruntime", "onnx", "the onnxruntime runtime")
    from qcloop.deploy.onnx.runtime import runtime_for_run

    return runtime_for_run(run_dir, view, cfg, **params)


@hookimpl
def register_runtimes(register: Register) -> None:
    """Register the ``onnxruntime`` runtime."""
    register("onnxruntime", onnxruntime_runtime)


def onnx_card_model(card: ModelCard) -> Any:
    """The ``onnx`` model kind: an ``ExternalModel`` running the card's ONNX file (see
    :func:`qcloop.deploy.onnx.card_model.load_onnx`; the ``onnx`` extra)."""
    from qcloop.deploy.onnx.card_model import load_onnx

    return load_onnx(card)


def ray_engine(**params: Any) -> Any:
    """The ``ray`` engine of assess and predict (parameters: ``address``, ``workers``,
    ``num_gpus_per_worker``, ``batch_size``; see :class:`qcloop.deploy.scale.ray_engine.RayEngine`;
    the ``ray`` extra)."""
    from qcloop.deploy.scale.ray_engine import RayEngine

    return RayEngine(**params)


@hookimpl
def register_engines(register: Register) -> None:
    """Register the ``ray`` engine."""
    register("ray", ray_engine)


@hookimpl
def register_model_kinds(register: Register) -> None:
    """Register the ``onnx`` model kind."""
    register("onnx", onnx_card_model)


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``serve``, ``export-onnx`` and ``export-triton`` to ``qcloop``, and ``inference``
    and ``serve`` to its ``bench`` group."""
    import click

    from qcloop.deploy.commands.bench import inference, serve_benchmark
    from qcloop.deploy.commands.export import export_onnx, export_triton
    from qcloop.deploy.commands.serve import serve

    for command in (serve, export_onnx, export_triton):
        cli.add_command(command)
    bench = cli.get_command(click.Context(cli), BENCH_GROUP)
    if isinstance(bench, click.Group):
        bench.add_command(inference)
        bench.add_command(serve_benchmark, "serve")
