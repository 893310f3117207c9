"""``qcloop export-onnx`` of a calibrated run (``qcloop calibrate``): the card's model as one
ONNX file beside a card naming it, so that ONNX Runtime serves the model qcloop did not train
exactly as its card says.

* ``kind: onnx``: the model file is copied unchanged (its digest is the calibrated run's);
* ``kind: torch``: the module is converted with the run's exporter and checked against PyTorch
  on the card's own preparation of real slices before it is written;
* ``kind: torchscript`` and ``nnunet`` (and plugin kinds) are refused with the way out: export
  the model to ONNX where it was made and calibrate an ``onnx`` card, or serve the calibrated
  run with ``--runtime torch``.

The export's card keeps the card's ``input`` and ``output`` (preparation, activation, label
order); a converted model returns the module's raw output, so the card's activation still
applies. The QC module is exported as for qcloop's own runs (:mod:`qcloop.deploy.onnx.export`),
checked on the card model's maps taken onto the QC grid.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from qcloop.deploy.onnx.errors import ExportError
from qcloop.deploy.onnx.manifest import SEGMENTER_INPUT, SEGMENTER_OUTPUT, model_entry
from qcloop.deploy.onnx.parity import check_parity, parity_line
from qcloop.deploy.onnx.parity_data import parity_slices
from qcloop.monitor.core.atomic import sha256_file

__all__ = ["CARD_FILE", "export_card_candidate"]

#: The card of an exported view, beside its model file.
CARD_FILE = "card.yaml"
_MODEL_FILE = "model.onnx"


class _FirstOutput(torch.nn.Module):
    """A module whose list output (deep supervision) is cut to its first element, for export."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The inner module's (first) output."""
        out = self.inner(x)
        return out[0] if isinstance(out, list | tuple) else out


def _way_out(kind: str) -> str:
    """What to do with a card kind that cannot be exported here."""
    return (
        f"a {kind} model card cannot be exported to ONNX here; export the model to ONNX where "
        "it was made and calibrate an onnx card, or serve this run with --runtime torch"
    )


def export_card_candidate(
    predictor: Any,
    view: str,
    common: dict[str, Any],
    staging: Path,
    settings: Any,
    run_data: Path | None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Export one view's card model into ``staging/VIEW``; its manifest entry, the card-grid
    parity slices and the model's qcloop-order probabilities of them."""
    card = predictor.card
    if card.kind not in ("onnx", "torch"):
        raise ExportError(f"{card.card_path}: {_way_out(card.kind)}")
    parity = parity_slices(
        view, _parity_preprocessor(predictor), run_data=run_data, data=settings.data,
        max_cases=settings.max_cases, seed=0,
    )  # fmt: skip
    label = f"{view}/{_MODEL_FILE}"
    target = staging / label
    if card.kind == "onnx":
        shutil.copy2(card.resolved_path, target)
        figures = {"copied": str(card.resolved_path)}
    else:
        figures = _convert_torch(predictor, parity.images, label, target, common, settings)
    copied = card.kind == "onnx"
    settings.say(f"{label}: copied" if copied else parity_line(label, figures))
    data = {**card.to_dict(), "path": _MODEL_FILE, "views": [view]}
    data.pop("module", None), data.pop("params", None)
    data["kind"] = "onnx"
    (staging / view / CARD_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
    probs = predictor.slice_probabilities(parity.images)
    entry = model_entry(
        label, index=0, card=f"{view}/{CARD_FILE}", source_kind=card.kind,
        source=str(card.resolved_path), input_name=SEGMENTER_INPUT, output_name=SEGMENTER_OUTPUT,
        softmax_applied=card.output.activation != "softmax", sha256=sha256_file(target),
        parity=figures,
    )  # fmt: skip
    return entry, parity.images, probs


def _parity_preprocessor(predictor: Any) -> Any:
    """The card's preparation, with a fixed side when the card leaves it open (the QC grid's
    side rounded up to the card's divisor), so that parity slices stack."""
    from qcloop.monitor.data.preprocess import Preprocessor

    spec = predictor.card.input
    size = spec.size or -(-128 // spec.divisor) * spec.divisor
    return Preprocessor(
        size,
        target_spacing=spec.spacing_mm,
        divisor=spec.divisor,
        normalisation=spec.normalise,
        percentiles=spec.percentiles,
    )


def _convert_torch(
    predictor: Any,
    images: np.ndarray,
    label: str,
    target: Path,
    common: dict[str, Any],
    settings: Any,
) -> dict[str, Any]:
    """Convert a torch card's module, check it against PyTorch on ``images``, write it."""
    from qcloop.deploy.onnx.convert import set_metadata, to_onnx

    module = _FirstOutput(predictor.model.module).eval()
    x = np.ascontiguousarray(images[:, None], dtype=np.float32)
    names = (SEGMENTER_INPUT, SEGMENTER_OUTPUT)
    try:
        proto = to_onnx(
            module, torch.from_numpy(x[:2]), *names, predictor.card.input.divisor,
            settings.opset, settings.exporter,
        )  # fmt: skip
    except Exception as exc:
        raise ExportError(f"{label}: conversion of {predictor.card.module} failed ({exc})") from exc
    meta = {**common, "role": "card-model", "source_kind": "torch", "module": predictor.card.module}
    set_metadata(proto, meta)
    payload = proto.SerializeToString()

    def reference(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).numpy()

    logits = predictor.card.output.activation == "softmax"
    figures, _ = check_parity(label, payload, reference, x, settings.tolerance, logits=logits)
    target.write_bytes(payload)
    return figures
