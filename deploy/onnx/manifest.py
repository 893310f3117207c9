"""The format of an ONNX export: its files, tensor names and ``manifest.json``.

::

    DIR/manifest.json              views -> files, parity figures, opset, library versions
    DIR/<VIEW>/candidate-<i>.onnx  segmenter i (best first, the order of candidates.json):
                                   input ``image`` (N, 1, H, W) -> output ``logits`` (N, C, H, W)
    DIR/<VIEW>/qc.onnx             QC module: ``probabilities`` (N, C, S, S) ->
                                   ``reconstruction`` (N, C, S, S), softmax applied
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from qcloop.deploy.onnx.errors import ExportError
from qcloop.deploy.onnx.parity import MAX_ABS_DIFF, MIN_ARGMAX_AGREEMENT
from qcloop.monitor import __version__

__all__ = [
    "MANIFEST",
    "MANIFEST_FORMAT",
    "QC_INPUT",
    "QC_OUTPUT",
    "SEGMENTER_INPUT",
    "SEGMENTER_OUTPUT",
    "library_versions",
    "load_manifest",
    "log_to_tracker",
    "model_entry",
    "new_manifest",
]

#: Name of the manifest written beside the models, and its format tag.
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "qcloop.onnx-export/1"
#: Tensor names of the exported graphs.
SEGMENTER_INPUT, SEGMENTER_OUTPUT = "image", "logits"
QC_INPUT, QC_OUTPUT = "probabilities", "reconstruction"


def library_versions() -> dict[str, str]:
    """Versions of the libraries an export depends on."""
    import onnx
    import onnxruntime
    import torch

    versions = {
        "qcloop": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    try:
        import onnxscript

        versions["onnxscript"] = onnxscript.__version__
    except ImportError:  # only the dynamo exporter needs it
        pass
    return versions


def new_manifest(run: Path, run_kind: str, exporter: str) -> dict[str, Any]:
    """The manifest of an export of ``run`` before any view is added (``opset`` unknown yet)."""
    return {
        "format": MANIFEST_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": str(run.resolve()),
        "run_kind": run_kind,
        "exporter": exporter,
        "opset": None,
        "versions": library_versions(),
        "tolerances": {
            "max_abs_diff": MAX_ABS_DIFF,
            "min_argmax_agreement": MIN_ARGMAX_AGREEMENT,
        },
        "views": {},
    }


def model_entry(
    file: str,
    *,
    input_name: str,
    output_name: str,
    softmax_applied: bool,
    sha256: str,
    parity: dict[str, Any],
    **specific: Any,
) -> dict[str, Any]:
    """One model of a view in the manifest: its file, ``specific`` fields (a candidate's index,
    epoch..., the QC module's input mode), tensors, digest and parity figures."""
    return {
        "file": file,
        **specific,
        "input": input_name,
        "output": output_name,
        "softmax_applied": softmax_applied,
        "sha256": sha256,
        "parity": parity,
    }


def load_manifest(onnx_dir: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, checked for its format."""
    path = Path(onnx_dir) / MANIFEST
    if not path.exists():
        raise ExportError(f"{path}: missing - run `qcloop export-onnx` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ExportError(f"{path}: not a qcloop ONNX export manifest (format {MANIFEST_FORMAT})")
    if not isinstance(manifest.get("views"), dict) or not manifest["views"]:
        raise ExportError(f"{path}: field 'views' lists no exported view")
    return manifest


def _parity_metrics(manifest: dict[str, Any]) -> dict[str, float]:
    """``parity.<view>.<model>.<figure>`` for every model of the manifest."""
    metrics: dict[str, float] = {}
    for view, entry in manifest["views"].items():
        models = [(f"candidate-{c['index']}", c["parity"]) for c in entry["candidates"]]
        models.append(("qc", entry["qc"]["parity"]))
        for name, parity in models:
            for figure in ("max_abs_diff", "max_excess", "max_prob_diff", "argmax_agreement"):
                if figure in parity:  # a model card's file copied unchanged has no figures
                    metrics[f"parity.{view}.{name}.{figure}"] = float(parity[figure])
    return metrics


def log_to_tracker(tracker: Any, out: Path, manifest: dict[str, Any]) -> None:
    """Log the export folder and the parity figures to an experiment tracker."""
    tags = {
        "qcloop.command": "export-onnx",
        "qcloop.run": str(manifest.get("run", "")),
        "qcloop.views": ",".join(manifest["views"]),
    }
    with tracker.start_run("export-onnx", tags=tags):
        tracker.log_params(
            {
                "opset": manifest.get("opset"),
                "exporter": manifest.get("exporter"),
                **{f"version.{k}": v for k, v in manifest.get("versions", {}).items()},
            }
        )
        tracker.log_metrics(_parity_metrics(manifest))
        tracker.log_artifact(str(out), "onnx")
