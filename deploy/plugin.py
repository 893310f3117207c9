"""The deploy plugin: the ``onnxruntime`` runtime (models exported by ``qcloop export-onnx``).
Needs the ``onnx`` extra."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qcloop.monitor import hookimpl
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.hookspecs import Register


def onnxruntime_runtime(
    run_dir: Path,
    view: str,
    cfg: QcloopConfig,
    *,
    onnx_dir: str | Path | None = None,
    threads: int | None = None,
    **params: Any,
) -> Any:
    """The ``onnxruntime`` runtime of ``view``: the ONNX models in ``onnx_dir`` (default
    ``RUN/onnx``), ``threads`` intra-op threads per session (ONNX Runtime's default when
    ``None``); other ``params`` (``providers``, ``batch_size``) go to
    :meth:`~qcloop.deploy.onnx_runtime.OrtRuntime.from_export`."""
    from qcloop.deploy.onnx_runtime import OrtRuntime

    folder = Path(onnx_dir) if onnx_dir is not None else Path(run_dir) / "onnx"
    return OrtRuntime.from_export(folder, view, threads=threads, **params)


@hookimpl
def register_runtimes(register: Register) -> None:
    """Register the ``onnxruntime`` runtime."""
    register("onnxruntime", onnxruntime_runtime)
