"""The built-in ``torch`` runtime: a run's PyTorch candidates and QC module, in process."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qcloop.monitor import hookimpl
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.hookspecs import Register
from qcloop.monitor.method.qc_call import call_reconstruct, needs_image

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.method.assessment import CaseOrigin


class TorchRuntime:
    """:class:`Runtime` on PyTorch modules of a loaded :class:`~qcloop.monitor.method.run_folder.ModelSet`."""

    name = "torch"

    def __init__(self, model_set: Any, input_size: int, batch_size: int = 16) -> None:
        self.model_set = model_set
        self.input_size = int(input_size)
        self.divisor = int(getattr(model_set.best, "divisor", 1))
        self.n_candidates = len(model_set.candidates)
        self.batch_size = int(batch_size)
        #: whether the QC module reads the image beside the maps (``reconstruct(maps, image=)``)
        self.needs_image = needs_image(model_set.qc)
        for model in model_set.candidates:
            if hasattr(model, "eval"):  # a model-card candidate runs as its card says
                model.eval()

    def segment(self, image: np.ndarray, origin: CaseOrigin | None = None) -> list[np.ndarray]:
        """Softmax maps of every candidate (no gradients); ``origin`` (the original case and
        its transform) is what a model-card candidate runs on."""
        import torch

        from qcloop.monitor.method.assessment import net_probabilities

        with torch.inference_mode():
            return [
                net_probabilities(m, image, self.batch_size, origin)
                for m in self.model_set.candidates
            ]

    def reconstruct(self, probabilities: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """The QC module's reconstruction (``image``: the case's prepared slices, for a QC module
        that reads them)."""
        return call_reconstruct(self.model_set.qc, probabilities, image)

    def providers(self) -> list[str]:
        """``["torch:cpu"]`` or ``["torch:cuda"]``: the device of the first candidate's weights;
        for a model-card candidate, what its own runtime reports."""
        best = self.model_set.best
        if hasattr(best, "net_probabilities"):  # a model card: its own loader's runtime
            return [f"{best.card.kind}:{p}" for p in best.model.providers()]
        param = next(best.parameters())
        return [f"torch:{param.device.type}"]


def torch_runtime(
    run_dir: Path,
    view: str,
    cfg: QcloopConfig,
    *,
    batch_size: int = 16,
    threads: int | None = None,
) -> TorchRuntime:
    """The ``torch`` runtime of ``view`` in ``run_dir``. ``threads`` is accepted for a uniform
    call and ignored: torch's thread count is process-wide (``torch.set_num_threads``)."""
    from qcloop.monitor.method.run_folder import load_model_set

    return TorchRuntime(load_model_set(run_dir, view, cfg), cfg.preprocessing.size, batch_size)


@hookimpl
def register_runtimes(register: Register) -> None:
    """Register the built-in ``torch`` runtime."""
    register("torch", torch_runtime)
