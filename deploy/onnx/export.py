"""``qcloop export-onnx``: every candidate segmenter and the QC module of each view of a run
become one ONNX model each (layout and manifest: :mod:`qcloop.deploy.onnx.manifest`).

Axes N, H and W are dynamic (H and W multiples of the network's divisor). Each model carries
its identity in ``metadata_props`` (view, labels, input size, spacing, divisor, versions, ...).
Every model is checked against PyTorch on real slices (:mod:`qcloop.deploy.onnx.parity`) before
it is written. The whole export is staged beside its folder and moved into place only when every
model passed: a failed export leaves no model behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.deploy.onnx.convert import (
    EXPORTERS,
    copy_proto,
    opset_of,
    qc_divisor,
    qc_export_module,
    reweighted,
    set_metadata,
    to_onnx,
)
from qcloop.deploy.onnx.errors import ExportError
from qcloop.deploy.onnx.manifest import (
    MANIFEST,
    QC_INPUT,
    QC_OUTPUT,
    SEGMENTER_INPUT,
    SEGMENTER_OUTPUT,
    model_entry,
    new_manifest,
)
from qcloop.deploy.onnx.parity import ParityTolerance, check_parity, parity_line
from qcloop.deploy.onnx.parity_data import ParityData, parity_slices
from qcloop.deploy.staging import is_replaceable, staged_folder
from qcloop.monitor import LABELS, __version__
from qcloop.monitor.core.atomic import sha256_file, write_json

log = logging.getLogger(__name__)

__all__ = ["export_run"]


@dataclass(frozen=True)
class _Settings:
    """What every model of one export shares: the converter's options and the parity data."""

    opset: int | None
    exporter: str
    data: Path | None
    max_cases: int
    say: Callable[[str], None]
    tolerance: ParityTolerance


def export_run(
    run: str | Path,
    out: str | Path | None = None,
    *,
    views: Sequence[str] | None = None,
    opset: int | None = None,
    data: str | Path | None = None,
    max_cases: int = 4,
    exporter: str = "dynamo",
    echo: Callable[[str], None] | None = None,
    tolerance: ParityTolerance | None = None,
) -> dict[str, Any]:
    """Export every candidate segmenter and the QC module of each view of ``run`` to ONNX.

    Args:
        run: a run folder (trained, refined, or calibrated: a model card, see
            :mod:`qcloop.deploy.onnx.card_export`).
        out: export folder (default ``RUN/onnx``); a previous export there is replaced.
        views: views to export (default: every trained view).
        opset: ONNX opset (default: the exporter's).
        data: a dataset folder for the parity check (default: the run's ``data`` when present,
            else phantoms rendered in memory).
        max_cases: cases per view for the parity check (LA: four times as many).
        exporter: ``"dynamo"`` (``torch.export``; default) or ``"torchscript"`` (legacy).
        echo: receives one progress line per model.

    Returns:
        The manifest (also written to ``OUT/manifest.json``).

    Raises:
        ParityError: a model disagrees with PyTorch; nothing is written.
        ExportError: the run or the data cannot be used.
    """
    from qcloop.monitor.method.run_folder import RunError, load_run_config, read_run_info

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    settings = _Settings(
        opset, exporter, Path(data) if data else None, max_cases,
        echo or (lambda line: log.info("%s", line)), tolerance or ParityTolerance(),
    )  # fmt: skip
    run = Path(run)
    out = Path(out) if out is not None else run / "onnx"
    try:
        cfg = load_run_config(run)
        info = read_run_info(run)
    except RunError as exc:
        raise ExportError(str(exc)) from exc
    chosen = _chosen_views(run, views)
    _check_out(out)
    run_data = Path(info["data"]) if info.get("data") else None
    manifest = new_manifest(run, info.get("kind", "trained"), exporter)
    with staged_folder(out) as staging:
        for view in chosen:
            entry, opset_used = _export_view(run, view, cfg, info, staging, run_data, settings)
            manifest["views"][view] = entry
            manifest["opset"] = opset_used
        write_json(staging / MANIFEST, manifest)
    return manifest


def _chosen_views(run: Path, views: Sequence[str] | None) -> list[str]:
    """The views to export: ``views``, each trained in ``run``, else every trained view."""
    from qcloop.monitor.method.run_folder import run_views

    available = run_views(run)
    chosen = list(views) if views else available
    for view in chosen:
        if view not in available:
            raise ExportError(f"{run}: has no trained {view} model set (trained: {available})")
    if not chosen:
        raise ExportError(f"{run}: the run has no trained view")
    return chosen


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder that is not an export."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if not is_replaceable(out, MANIFEST):
        raise ExportError(
            f"{out}: folder is not empty and holds no {MANIFEST}; refusing to replace it "
            "(choose another --out)"
        )


def _say_parity_source(view: str, parity: ParityData, say: Callable[[str], None]) -> None:
    if parity.source == "phantoms-in-memory":
        say(
            f"{view}: no data folder (run.json 'data' missing or absent, no --data): "
            f"parity checked on {len(parity.images)} phantom slices rendered in memory"
        )
    else:
        say(
            f"{view}: parity data: {len(parity.images)} slices of {len(parity.cases)} "
            f"cases from {parity.path} ({parity.source})"
        )


def _export_view(
    run: Path,
    view: str,
    cfg: Any,
    info: dict[str, Any],
    staging: Path,
    run_data: Path | None,
    settings: _Settings,
) -> tuple[dict[str, Any], int]:
    """Export one view into ``staging/VIEW``; its manifest entry and the segmenters' opset."""
    from qcloop.monitor.method.cases import make_preprocessor
    from qcloop.monitor.method.qc_call import needs_image
    from qcloop.monitor.method.run_folder import RunError, load_model_set

    try:
        model_set = load_model_set(run, view, cfg)
    except RunError as exc:
        raise ExportError(str(exc)) from exc
    if needs_image(model_set.qc):
        raise ExportError(
            f"{run}/{view}: its QC module ({cfg.qc.module.name}) reads the image beside the "
            "masks; the ONNX export holds mask-only QC modules (one input). Serve this run "
            "with the torch runtime (qcloop serve --runtime torch)"
        )
    size = cfg.preprocessing.size
    divisor = int(getattr(model_set.best, "divisor", 1) or 1)
    if size % divisor:
        raise ExportError(
            f"{run / 'config.yaml'}: preprocessing.size {size} is not a multiple of the "
            f"segmenter's divisor {divisor}"
        )
    parity = parity_slices(
        view, make_preprocessor(cfg, divisor), run_data=run_data, data=settings.data,
        max_cases=settings.max_cases, seed=cfg.seed,
    )  # fmt: skip
    _say_parity_source(view, parity, settings.say)
    (staging / view).mkdir()
    common = {
        "view": view,
        "labels": {str(k): v for k, v in LABELS.items()},
        "input_size": size,
        "spacing_mm": cfg.preprocessing.target_spacing_mm,
        "normalisation": cfg.preprocessing.normalisation,
        "divisor": divisor,
        "qcloop_version": __version__,
        "run": str(run.resolve()),
        "run_kind": str(info.get("kind", "trained")),
    }
    if hasattr(model_set.best, "net_probabilities"):  # a model card (qcloop calibrate)
        candidates, probabilities, opset = _export_card(
            model_set.best, common, staging, cfg, settings, run_data
        )
    else:
        x = parity.images[:, None]
        candidates, probabilities, opset = _export_candidates(
            model_set, x, common, staging, cfg, settings
        )
    qc = _export_qc(model_set.qc, probabilities, common, staging, cfg, settings)
    entry = {
        "input_size": size,
        "divisor": divisor,
        "spacing_mm": cfg.preprocessing.target_spacing_mm,
        "normalisation": cfg.preprocessing.normalisation,
        "num_classes": int(model_set.qc.num_classes),
        "labels": common["labels"],
        "parity_data": parity.describe(),
        "candidates": candidates,
        "qc": qc,
    }
    return entry, opset


def _metadata(
    common: dict[str, Any],
    role: str,
    specific: dict[str, Any],
    *,
    num_classes: int,
    softmax_applied: bool,
    names: tuple[str, str],
) -> dict[str, Any]:
    """The ``metadata_props`` of one model: the view's, its role's, then its tensors'."""
    return {
        **common,
        "role": role,
        **specific,
        "num_classes": num_classes,
        "softmax_applied": softmax_applied,
        "input_name": names[0],
        "output_name": names[1],
    }


def _convert(
    label: str, module: Any, example: Any, names: tuple[str, str], divisor: int, s: _Settings
) -> Any:
    """:func:`to_onnx` with a failure reported as the model's :class:`ExportError`."""
    try:
        return to_onnx(module, example, names[0], names[1], divisor, s.opset, s.exporter)
    except Exception as exc:
        raise ExportError(f"{label}: conversion failed ({exc})") from exc


def _write_checked(
    label: str,
    proto: Any,
    metadata: dict[str, Any],
    reference: Callable[[np.ndarray], np.ndarray],
    inputs: np.ndarray,
    root: Path,
    settings: _Settings,
) -> tuple[dict[str, Any], np.ndarray, str]:
    """Set the metadata, check parity on ``inputs``, write ``root/label``; the parity figures,
    PyTorch's outputs and the file's sha256."""
    set_metadata(proto, metadata)
    payload = proto.SerializeToString()
    logits = metadata.get("role") == "segmenter"
    figures, want = check_parity(
        label, payload, reference, inputs, settings.tolerance, logits=logits
    )
    path = root / label
    path.write_bytes(payload)
    settings.say(parity_line(label, figures))
    return figures, want, sha256_file(path)


def _export_candidates(
    model_set: Any,
    x: np.ndarray,
    common: dict[str, Any],
    staging: Path,
    cfg: Any,
    settings: _Settings,
) -> tuple[list[dict[str, Any]], list[np.ndarray], int]:
    """Every candidate segmenter of a view: manifest entries, softmax maps of the parity
    slices (the QC module's parity inputs) and the opset."""
    import torch

    names = (SEGMENTER_INPUT, SEGMENTER_OUTPUT)
    example = torch.from_numpy(x[: min(2, len(x))])
    entries, probabilities, first_proto, opset = [], [], None, 0
    for index, (model, meta) in enumerate(
        zip(model_set.candidates, model_set.candidate_info, strict=True)
    ):
        model.eval()
        label = f"{common['view']}/candidate-{index}.onnx"
        # candidates share one architecture: convert once, then swap the weights in
        proto = None
        if first_proto is not None and type(model) is type(model_set.best):
            proto = reweighted(first_proto, model)
        if proto is None:
            proto = _convert(label, model, example, names, common["divisor"], settings)
            if first_proto is None:
                first_proto = copy_proto(proto)
        describe = model.describe() if hasattr(model, "describe") else {}
        specific = {
            "candidate_index": index,
            "epoch": int(meta.get("epoch", -1)),
            "val_dice": float(meta.get("val_dice", 0.0)),
            "source": str(meta.get("path", "")),
            "architecture": str(describe.get("architecture", type(model).__name__)),
            "segmenter": cfg.segmenter.name,
        }
        metadata = _metadata(
            common, "segmenter", specific, softmax_applied=False, names=names,
            num_classes=int(getattr(model, "num_classes", len(LABELS))),
        )  # fmt: skip

        def reference(batch: np.ndarray, model: Any = model) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(batch)).numpy()

        figures, logits, digest = _write_checked(
            label, proto, metadata, reference, x, staging, settings
        )
        probabilities.append(torch.softmax(torch.from_numpy(logits), 1).numpy())
        opset = opset_of(proto)
        entry = model_entry(
            label, index=index, epoch=specific["epoch"], val_dice=specific["val_dice"],
            source=specific["source"], input_name=names[0], output_name=names[1],
            softmax_applied=False, sha256=digest, parity=figures,
        )  # fmt: skip
        entries.append(entry)
    return entries, probabilities, opset


def _export_card(
    predictor: Any,
    common: dict[str, Any],
    staging: Path,
    cfg: Any,
    settings: _Settings,
    run_data: Path | None,
) -> tuple[list[dict[str, Any]], list[np.ndarray], int]:
    """A calibrated run's card model (:mod:`qcloop.deploy.onnx.card_export`): its manifest
    entry, its maps of the parity slices taken onto the QC grid (the QC module's parity
    inputs), and the opset of the written file."""
    import onnx

    from qcloop.deploy.onnx.card_export import export_card_candidate
    from qcloop.monitor.method.refine_card import resample_centred

    entry, _, probs = export_card_candidate(
        predictor, common["view"], common, staging, settings, run_data
    )
    qc_spacing = cfg.preprocessing.target_spacing_mm or predictor.card.input.spacing_mm or 1.0
    card_spacing = predictor.card.input.spacing_mm or qc_spacing
    on_qc = resample_centred(probs, card_spacing, common["input_size"], qc_spacing)
    opset = opset_of(onnx.load(str(staging / entry["file"]), load_external_data=False))
    return [entry], [on_qc], opset


def _export_qc(
    qc: Any,
    probabilities: list[np.ndarray],
    common: dict[str, Any],
    staging: Path,
    cfg: Any,
    settings: _Settings,
) -> dict[str, Any]:
    """The view's QC module, checked on the candidates' softmax maps; its manifest entry."""
    import torch

    names = (QC_INPUT, QC_OUTPUT)
    inputs = np.concatenate(probabilities).astype(np.float32)
    label = f"{common['view']}/qc.onnx"
    divisor = qc_divisor(common["input_size"])
    proto = _convert(
        label, qc_export_module(qc), torch.from_numpy(inputs[:2]), names, divisor, settings
    )
    metadata = _metadata(
        common, "qc", {"qc_module": cfg.qc.module.name, "qc_input": qc.input},
        num_classes=int(qc.num_classes), softmax_applied=True, names=names,
    )  # fmt: skip

    def reference(batch: np.ndarray) -> np.ndarray:
        return qc.reconstruct_tensor(torch.from_numpy(batch)).numpy()

    figures, _, digest = _write_checked(
        label, proto, metadata, reference, inputs, staging, settings
    )
    return model_entry(
        label, qc_input=qc.input, input_name=names[0], output_name=names[1],
        softmax_applied=True, sha256=digest, parity=figures,
    )  # fmt: skip
