"""A Triton Inference Server model repository from a qcloop ONNX export.

Layout (one set per view; ``v`` is ``sa`` or ``la``)::

    REPO/v_candidate_<i>/config.pbtxt, 1/model.onnx   segmenter i: image -> logits
    REPO/v_segmenter_probs/...                        the best segmenter with a Softmax node
                                                      appended: image -> probabilities
    REPO/v_qc/...                                     QC module: probabilities -> reconstruction
    REPO/v_qc_ensemble/config.pbtxt, 1/               ensemble: image -> probabilities (best
                                                      segmenter) -> reconstruction (QC)
    REPO/qcloop-repository.json                       what was written, from which export

Softmax placement: the QC module takes probabilities, and an ensemble cannot compute by itself,
so the ensemble's first step is ``v_segmenter_probs``: the parity-checked best segmenter graph
with one ``Softmax(axis=1)`` node appended (checked against the logits model when written). The
``v_candidate_<i>`` models keep raw logits for clients that combine candidates themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qcloop.deploy.staging import is_replaceable, staged_folder
from qcloop.deploy.triton.check import check_repository
from qcloop.deploy.triton.configs import ensemble_config, onnx_model_config
from qcloop.deploy.triton.errors import TritonError
from qcloop.deploy.triton.schema import validate_model_config
from qcloop.monitor import __version__
from qcloop.monitor.core.atomic import write_json, write_text

__all__ = ["REPOSITORY_SUMMARY", "read_repository_summary", "write_repository"]

REPOSITORY_SUMMARY = "qcloop-repository.json"
REPOSITORY_FORMAT = "qcloop.triton-repository/1"


def _append_softmax(path: Path, output: str) -> Any:
    """The segmenter ONNX model at ``path`` with ``Softmax(axis=1)`` appended to its output
    (renamed ``output``) and its metadata updated to say so."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    logits = model.graph.output[0]
    model.graph.node.append(helper.make_node("Softmax", [logits.name], [output], axis=1))
    new_output = onnx.ValueInfoProto()
    new_output.CopyFrom(logits)
    new_output.name = output
    del model.graph.output[:]
    model.graph.output.append(new_output)
    for prop in model.metadata_props:
        if prop.key == "softmax_applied":
            prop.value = "true"
        elif prop.key == "output_name":
            prop.value = output
    onnx.checker.check_model(model)
    return model


def _with_softmax(path: Path, output: str = "probabilities") -> bytes:
    """:func:`_append_softmax` serialised, checked against softmax of the original's logits on
    random input (max |diff| <= 1e-6)."""
    import onnxruntime as ort

    model = _append_softmax(path, output)
    payload = model.SerializeToString()
    meta = {p.key: p.value for p in model.metadata_props}
    if "input_size" not in meta:
        raise TritonError(f"{path}: no input_size in its metadata; not a qcloop export")
    size = int(meta["input_size"])
    x = np.random.default_rng(0).standard_normal((2, 1, size, size)).astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    base = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    probs = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    (z,) = base.run(None, {base.get_inputs()[0].name: x})
    (p,) = probs.run(None, {probs.get_inputs()[0].name: x})
    e = np.exp(z - z.max(1, keepdims=True))
    diff = float(np.abs(p - e / e.sum(1, keepdims=True)).max())
    if not diff <= 1e-6:
        raise TritonError(f"{path}: softmax variant differs from softmax(logits) by {diff:.2e}")
    return payload


@dataclass
class _StagedRepository:
    """Models written into a staging folder, each validated first, and what each is."""

    root: Path
    max_batch: int
    kind: str
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per view, the model card of a calibrated run's model (the client prepares as it says)
    cards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(
        self, name: str, config: str, view: str, role: str, source: str, model: bytes | None
    ) -> None:
        """Validate ``config`` and write it with version folder ``1/`` (holding ``model`` when
        given; an ensemble has none, but Triton wants the folder)."""
        validate_model_config(config, f"{name}/config.pbtxt")
        (self.root / name / "1").mkdir(parents=True)
        if model is not None:
            (self.root / name / "1" / "model.onnx").write_bytes(model)
        write_text(self.root / name / "config.pbtxt", config)
        self.models[name] = {"view": view, "role": role, "source": source}

    def onnx_config(self, name: str, inputs: list[Any], outputs: list[Any], note: str) -> str:
        """An ONNX Runtime model's configuration with this repository's batch and instances."""
        return onnx_model_config(
            name, inputs, outputs, max_batch=self.max_batch, kind=self.kind, note=note
        )


def _add_card_view(repo: _StagedRepository, src: Path, view: str, entry: dict[str, Any]) -> None:
    """One view of a calibrated run's export: the card's model as it is (``v_card_model``,
    tensors as its file names them, on the card's grid and in its label order) and the QC
    module. There is no ensemble: the card's preparation, activation and label order, and the
    move onto the QC grid, happen in the client (the card is in the repository summary)."""
    from qcloop.deploy.triton.check import _onnx_signature

    v, cand = view.lower(), entry["candidates"][0]
    sig = _onnx_signature(src / cand["file"])
    tensors = {
        kind: [(name, [-1 if isinstance(d, str) or d <= 0 else d for d in dims[1:]])
               for name, (_, dims) in sig[kind].items()]
        for kind in ("input", "output")
    }  # fmt: skip
    name = f"{v}_card_model"
    note = (
        f"{view} model qcloop did not train ({cand.get('source_kind', 'onnx')} card): raw output."
    )
    config = repo.onnx_config(name, tensors["input"], tensors["output"], note)
    repo.add(name, config, view, "card-model", cand["file"], (src / cand["file"]).read_bytes())
    repo.cards[view] = yaml.safe_load((src / cand["card"]).read_text())
    s, c = int(entry["input_size"]), int(entry["num_classes"])
    maps = [c, s, s]
    qc_name, qc_file = f"{v}_qc", entry["qc"]["file"]
    note = f"{view} QC autoencoder: reconstructed probabilities (softmax applied)."
    config = repo.onnx_config(qc_name, [("probabilities", maps)], [("reconstruction", maps)], note)
    repo.add(qc_name, config, view, "qc", qc_file, (src / qc_file).read_bytes())


def _add_view(repo: _StagedRepository, src: Path, view: str, entry: dict[str, Any]) -> None:
    """The models of one view of the export ``src``: candidates, the best one with softmax,
    the QC module and the ensemble of those two (a calibrated run's card model:
    :func:`_add_card_view`)."""
    if entry["candidates"] and "card" in entry["candidates"][0]:
        _add_card_view(repo, src, view, entry)
        return
    v = view.lower()
    s, c = int(entry["input_size"]), int(entry["num_classes"])
    image, maps = ("image", [1, s, s]), [c, s, s]
    for cand in entry["candidates"]:
        name = f"{v}_candidate_{cand['index']}"
        note = (
            f"{view} segmenter candidate {cand['index']} (epoch {cand['epoch']}, "
            f"val Dice {cand['val_dice']:.4f}): logits."
        )
        config = repo.onnx_config(name, [image], [("logits", maps)], note)
        repo.add(name, config, view, "segmenter", cand["file"], (src / cand["file"]).read_bytes())
    best = entry["candidates"][0]
    probs_name = f"{v}_segmenter_probs"
    note = f"{view} best segmenter with Softmax(axis=1) appended: probabilities."
    config = repo.onnx_config(probs_name, [image], [("probabilities", maps)], note)
    payload = _with_softmax(src / best["file"])
    repo.add(probs_name, config, view, "segmenter+softmax", best["file"], payload)
    qc_name, qc_file = f"{v}_qc", entry["qc"]["file"]
    note = f"{view} QC autoencoder: reconstructed probabilities (softmax applied)."
    config = repo.onnx_config(qc_name, [("probabilities", maps)], [("reconstruction", maps)], note)
    repo.add(qc_name, config, view, "qc", qc_file, (src / qc_file).read_bytes())
    ens_name = f"{v}_qc_ensemble"
    config = ensemble_config(
        ens_name, probs_name, qc_name, size=s, num_classes=c, max_batch=repo.max_batch
    )
    repo.add(ens_name, config, view, "ensemble", "", None)


def _chosen_views(src: Path, manifest: dict[str, Any], views: list[str] | None) -> list[str]:
    chosen = list(views) if views else list(manifest["views"])
    missing = [v for v in chosen if v not in manifest["views"]]
    if missing:
        raise TritonError(
            f"{src / 'manifest.json'}: no {', '.join(missing)} models in this export "
            f"(views: {sorted(manifest['views'])})"
        )
    return chosen


def write_repository(
    onnx_dir: str | Path,
    out: str | Path,
    *,
    max_batch: int = 16,
    kind: str = "gpu",
    views: list[str] | None = None,
) -> dict[str, Any]:
    """Write a Triton model repository for every view of the ONNX export in ``onnx_dir``.

    The repository is staged in a temporary folder, checked (:func:`check_repository`) and
    moved to ``out``; a previous qcloop repository there is replaced, any other non-empty
    folder is refused. ``views`` limits the views (default: every view of the export). Returns
    the summary also written to ``REPO/qcloop-repository.json``.
    """
    from qcloop.deploy.onnx.manifest import load_manifest

    if max_batch < 1:
        raise TritonError(f"max_batch must be >= 1, got {max_batch}")
    src = Path(onnx_dir)
    manifest = load_manifest(src)
    chosen = _chosen_views(src, manifest, views)
    out = Path(out)
    if not is_replaceable(out, REPOSITORY_SUMMARY):
        raise TritonError(
            f"{out}: exists and is not an empty folder nor a qcloop Triton repository; "
            "choose another --out"
        )
    with staged_folder(out) as staging:
        repo = _StagedRepository(staging, max_batch, kind)
        for view in chosen:
            _add_view(repo, src, view, manifest["views"][view])
        problems = check_repository(staging)
        if problems:
            raise TritonError("generated repository failed its checks:\n  " + "\n  ".join(problems))
        summary = {
            "format": REPOSITORY_FORMAT,
            "qcloop_version": __version__,
            "onnx_export": str(src.resolve()),
            "run": manifest.get("run"),
            "max_batch_size": max_batch,
            "instance_kind": kind,
            "models": repo.models,
        }
        if repo.cards:
            summary["cards"] = repo.cards
        write_json(staging / REPOSITORY_SUMMARY, summary)
    return summary


def read_repository_summary(repo: str | Path) -> dict[str, Any]:
    """The summary a repository was written with."""
    path = Path(repo) / REPOSITORY_SUMMARY
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TritonError(f"{path}: unreadable ({exc})") from exc
