"""Export a run's networks to ONNX, with a parity check against PyTorch.

Every candidate segmenter and the QC module of each view become one ONNX model each::

    DIR/manifest.json            views -> files, parity figures, opset, library versions
    DIR/<VIEW>/candidate-<i>.onnx  segmenter i (best first, the order of candidates.json):
                                   input ``image`` (N, 1, H, W) -> output ``logits`` (N, C, H, W)
    DIR/<VIEW>/qc.onnx           QC module: ``probabilities`` (N, C, S, S) ->
                                   ``reconstruction`` (N, C, S, S), softmax applied

Axes N, H and W are dynamic (H and W multiples of the network's divisor). Each model carries
its identity in ``metadata_props`` (view, labels, input size, spacing, divisor, versions, ...).

The parity check runs PyTorch and ONNX Runtime (CPU) on real slices: a few cases of the run's
data folder (or ``data``) preprocessed exactly as at inference, else phantoms rendered in memory.
Segmenters must agree to ``MAX_ABS_DIFF`` on logits and ``MIN_ARGMAX_AGREEMENT`` on the argmax;
the QC module the same on its reconstructed probabilities, fed with the segmenters' softmax
maps. The whole export is staged in a temporary folder and moved into place only when every
model passed: a failed export leaves no model behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor import LABELS, __version__
from qcloop.monitor.core.atomic import sha256_file, write_json

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST",
    "MANIFEST_FORMAT",
    "MAX_ABS_DIFF",
    "MIN_ARGMAX_AGREEMENT",
    "ExportError",
    "ParityData",
    "ParityError",
    "export_run",
    "library_versions",
    "load_manifest",
    "log_to_tracker",
    "parity_figures",
    "read_metadata",
    "replace_folder",
    "to_onnx",
]

#: Largest accepted |PyTorch - ONNX Runtime| on any logit / reconstructed probability.
MAX_ABS_DIFF: float = 1e-4
#: Smallest accepted fraction of pixels whose argmax agrees.
MIN_ARGMAX_AGREEMENT: float = 0.9999
#: Name of the manifest written beside the models.
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "qcloop.onnx-export/1"
#: Tensor names of the exported graphs.
SEGMENTER_INPUT, SEGMENTER_OUTPUT = "image", "logits"
QC_INPUT, QC_OUTPUT = "probabilities", "reconstruction"
#: Slices per ONNX Runtime call during the parity check (the last batch is usually partial, so
#: the dynamic batch axis is exercised too).
PARITY_BATCH = 16
EXPORTERS = ("dynamo", "torchscript")


class ExportError(RuntimeError):
    """The run cannot be exported (missing files, unusable data, a failed conversion)."""


class ParityError(ExportError):
    """An exported model disagrees with PyTorch beyond the tolerances; ``figures`` says by how
    much."""

    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures


@dataclass
class ParityData:
    """Preprocessed slices of one view for the parity check, and where they came from."""

    images: np.ndarray  # float32 (Z, S, S)
    source: str  # "run-data", "data-option" or "phantoms-in-memory"
    path: str | None
    cases: list[str]

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for the manifest."""
        return {
            "source": self.source,
            "path": self.path,
            "cases": list(self.cases),
            "slices": len(self.images),
        }


# --------------------------------------------------------------------------- parity data


def _sample_evenly(items: Sequence[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


def _slices_from_folder(
    root: Path, view: str, preprocessor: Any, max_cases: int, source: str
) -> ParityData:
    from qcloop.monitor.data import CaseError, discover, load_case

    try:
        sources = [s for s in discover(root, views=[view]) if s.view == view]
    except (CaseError, OSError, ValueError) as exc:
        raise ExportError(f"cannot read parity data: {exc}") from exc
    # LA views hold one slice per case: take more cases so the check sees several slices.
    wanted = max_cases if view == "SA" else max_cases * 4
    images, keys, errors = [], [], []
    for src in _sample_evenly(sorted(sources, key=lambda s: s.key), wanted):
        try:
            prepared = preprocessor.prepare(load_case(src))
        except (CaseError, ValueError) as exc:
            errors.append(str(exc))
            continue
        images.append(prepared.image)
        keys.append(src.key)
    if not images:
        detail = f" ({len(errors)} unreadable: {errors[0]})" if errors else ""
        raise ExportError(f"{root}: no usable {view} case for the parity check{detail}")
    return ParityData(np.concatenate(images).astype(np.float32), source, str(root), keys)


def _phantom_slices(view: str, preprocessor: Any, n_subjects: int, seed: int) -> ParityData:
    from qcloop.monitor.phantoms import (
        VENDORS,
        render_subject,
        sample_anatomy,
        sample_chain,
        sample_geometry,
    )

    vendors = list(VENDORS)
    n = n_subjects if view == "SA" else n_subjects * 4
    images, keys = [], []
    for i in range(n):
        vendor = vendors[i % len(vendors)]
        anatomy = sample_anatomy(np.random.default_rng([seed, i, 0]))
        geometry = sample_geometry(np.random.default_rng([seed, i, 1]), vendor, anatomy)
        chain = sample_chain(np.random.default_rng([seed, i, 2]), vendor)
        rendered = render_subject(anatomy, geometry, chain)
        spacing = tuple(float(s) for s in np.linalg.norm(rendered.affines[view][:3, :3], axis=0))
        for phase in ("ED", "ES"):
            volume = rendered.images[view, phase]
            transform = preprocessor.transform_for(volume.shape, spacing)
            normalised = preprocessor.normalise(volume)
            fill = float(normalised.min()) if normalised.size else 0.0
            images.append(transform.apply_image(normalised, fill=fill))
            keys.append(f"phantom-{seed}-{i}/{view}/{phase}")
    return ParityData(np.concatenate(images).astype(np.float32), "phantoms-in-memory", None, keys)


def parity_slices(
    view: str,
    preprocessor: Any,
    *,
    run_data: Path | None,
    data: Path | None,
    max_cases: int = 4,
    seed: int = 0,
) -> ParityData:
    """Slices for the parity check: ``data`` if given, else the run's data folder if it exists,
    else phantoms rendered in memory."""
    if data is not None:
        if not Path(data).is_dir():
            raise ExportError(f"{data}: --data is not a folder")
        return _slices_from_folder(Path(data), view, preprocessor, max_cases, "data-option")
    if run_data is not None and Path(run_data).is_dir():
        return _slices_from_folder(Path(run_data), view, preprocessor, max_cases, "run-data")
    return _phantom_slices(view, preprocessor, max(1, max_cases // 2), seed)


# --------------------------------------------------------------------------- conversion


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


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's INFO chatter (graph passes) and its optional-op warnings."""
    saved = {}
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


#: Loggers of the ONNX exporter stack that report every graph pass at INFO.
_NOISY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._export")


def to_onnx(
    module: Any,
    example: Any,
    input_name: str,
    output_name: str,
    divisor: int,
    opset: int | None,
    exporter: str,
) -> Any:
    """An ``onnx.ModelProto`` of ``module`` with dynamic batch, height and width axes."""
    import onnx
    import torch

    module.eval()
    if exporter == "dynamo":
        dim = torch.export.Dim
        batch = dim("batch", min=1, max=65536)
        limit = max(2, 8192 // divisor)
        height = dim("height_blocks", min=1, max=limit)
        width = dim("width_blocks", min=1, max=limit)
        shapes = ({0: batch, 2: height * divisor, 3: width * divisor},)
        with _quiet_exporter():
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes=shapes,
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        if program is None:  # pragma: no cover - torch returns the program when f is None
            raise ExportError("torch.onnx.export returned no program")
        return program.model_proto
    axes = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with _quiet_exporter():
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: axes, output_name: axes},
            opset_version=opset or 17,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def copy_proto(proto: Any) -> Any:
    """A deep copy of an ``onnx.ModelProto``."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _reweighted(proto: Any, model: Any) -> Any | None:
    """A copy of ``proto`` (exported from a network of the same architecture) holding the
    weights of ``model``: initializers named after its state-dict entries are replaced. None
    when the names, shapes or dtypes do not line up (then the caller exports afresh). The
    parity check of the result guards against anything this misses."""
    from onnx import numpy_helper

    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    copy = copy_proto(proto)
    replaced = 0
    for init in copy.graph.initializer:
        if init.name not in state:
            continue
        old = numpy_helper.to_array(init)
        new = state[init.name]
        if old.shape != new.shape or old.dtype != new.dtype:
            return None
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), init.name))
        replaced += 1
    params = sum(1 for name, _ in model.named_parameters())
    return copy if replaced >= params else None


def _set_metadata(proto: Any, metadata: dict[str, Any]) -> None:
    import onnx

    del proto.metadata_props[:]
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value, allow_nan=False)
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, text
    proto.producer_name = "qcloop"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)


def read_metadata(path: str | Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file (strings, as stored)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


# --------------------------------------------------------------------------- parity


def parity_figures(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max |difference| and argmax agreement (over the class axis 1) of two ``(N, C, H, W)``
    arrays."""
    if reference.shape != candidate.shape:
        raise ExportError(f"shape mismatch: PyTorch {reference.shape} vs ONNX {candidate.shape}")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    if not np.all(np.isfinite(candidate)):
        return {"max_abs_diff": float("inf"), "argmax_agreement": 0.0}
    agree = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    return {"max_abs_diff": float(diff.max()) if diff.size else 0.0, "argmax_agreement": agree}


def _run_session(session: Any, x: np.ndarray, batch: int) -> np.ndarray:
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(parts)


def _check_parity(
    label: str,
    proto_bytes: bytes,
    reference: Callable[[np.ndarray], np.ndarray],
    inputs: np.ndarray,
) -> tuple[dict[str, Any], np.ndarray]:
    """Run the serialised model in ONNX Runtime (CPU) on ``inputs`` and compare with
    ``reference``; return the figures and PyTorch's outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto_bytes, options, providers=["CPUExecutionProvider"])
    got = _run_session(session, inputs, PARITY_BATCH)
    want = np.concatenate(
        [reference(inputs[i : i + PARITY_BATCH]) for i in range(0, len(inputs), PARITY_BATCH)]
    )
    figures = parity_figures(want, got)
    figures = {
        "max_abs_diff": figures["max_abs_diff"],
        "argmax_agreement": figures["argmax_agreement"],
        "slices": len(inputs),
        "batch": PARITY_BATCH,
    }
    tol_diff, tol_agree = MAX_ABS_DIFF, MIN_ARGMAX_AGREEMENT
    if not (figures["max_abs_diff"] <= tol_diff and figures["argmax_agreement"] >= tol_agree):
        raise ParityError(
            f"{label}: ONNX Runtime disagrees with PyTorch: max |diff| "
            f"{figures['max_abs_diff']:.3g} (limit {tol_diff:g}), argmax agreement "
            f"{100 * figures['argmax_agreement']:.4f} % (limit {100 * tol_agree:g} %) on "
            f"{figures['slices']} slices; nothing was written",
            {**figures, "model": label},
        )
    figures["passed"] = True
    return figures, want


# --------------------------------------------------------------------------- QC wrapper


def _qc_export_module(qc: Any) -> Any:
    """The QC network as a module of probabilities -> reconstruction, applying the QC input mode
    (``"onehot"`` replaces the probabilities by the one-hot of their argmax) inside the graph."""
    import torch
    from torch import nn

    class QCGraph(nn.Module):
        def __init__(self, net: nn.Module, onehot: bool, num_classes: int) -> None:
            super().__init__()
            self.net = net
            self.onehot = onehot
            self.num_classes = num_classes

        def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
            x = probabilities
            if self.onehot:
                labels = x.argmax(dim=1)
                x = nn.functional.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).to(x.dtype)
            return self.net(x)

    return QCGraph(qc.net, qc.input == "onehot", qc.num_classes).eval()


# --------------------------------------------------------------------------- the export


def _segmenter_divisor(model: Any) -> int:
    return int(getattr(model, "divisor", 1) or 1)


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not (out / MANIFEST).exists():
            raise ExportError(
                f"{out}: folder is not empty and holds no {MANIFEST}; refusing to replace it "
                "(choose another --out)"
            )


def replace_folder(staging: Path, out: Path) -> None:
    """Move the staged export to ``out``, replacing a previous export there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
        try:
            staging.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


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
) -> dict[str, Any]:
    """Export every candidate segmenter and the QC module of each view of ``run`` to ONNX.

    Args:
        run: a trained run folder.
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
    import torch

    from qcloop.monitor.method.cases import make_preprocessor
    from qcloop.monitor.method.run_folder import (
        RunError,
        load_model_set,
        load_run_config,
        read_run_info,
        run_views,
    )

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    say = echo or (lambda line: log.info("%s", line))
    run = Path(run)
    out = Path(out) if out is not None else run / "onnx"
    try:
        cfg = load_run_config(run)
        info = read_run_info(run)
    except RunError as exc:
        raise ExportError(str(exc)) from exc
    available = run_views(run)
    chosen = list(views) if views else available
    for view in chosen:
        if view not in available:
            raise ExportError(f"{run}: has no trained {view} model set (trained: {available})")
    if not chosen:
        raise ExportError(f"{run}: the run has no trained view")
    _prepare_out(out)
    run_data = Path(info["data"]) if info.get("data") else None
    size = cfg.preprocessing.size
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": str(run.resolve()),
        "run_kind": info.get("kind", "trained"),
        "exporter": exporter,
        "opset": None,
        "versions": library_versions(),
        "tolerances": {
            "max_abs_diff": MAX_ABS_DIFF,
            "min_argmax_agreement": MIN_ARGMAX_AGREEMENT,
        },
        "views": {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        for view in chosen:
            try:
                model_set = load_model_set(run, view, cfg)
            except RunError as exc:
                raise ExportError(str(exc)) from exc
            divisor = _segmenter_divisor(model_set.best)
            if size % divisor:
                raise ExportError(
                    f"{run / 'config.yaml'}: preprocessing.size {size} is not a multiple of the "
                    f"segmenter's divisor {divisor}"
                )
            preprocessor = make_preprocessor(cfg, divisor)
            parity = parity_slices(
                view, preprocessor, run_data=run_data, data=Path(data) if data else None,
                max_cases=max_cases, seed=cfg.seed,
            )  # fmt: skip
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
            view_dir = staging / view
            view_dir.mkdir()
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
            x = parity.images[:, None]
            entries = []
            probabilities = []
            first_proto = None
            for index, (model, meta) in enumerate(
                zip(model_set.candidates, model_set.candidate_info, strict=True)
            ):
                model.eval()
                label = f"{view}/candidate-{index}.onnx"

                def reference(batch: np.ndarray, model: Any = model) -> np.ndarray:
                    with torch.inference_mode():
                        return model(torch.from_numpy(batch)).numpy()

                example = torch.from_numpy(x[: min(2, len(x))])
                # candidates share one architecture: convert once, then swap the weights in
                proto = None
                if first_proto is not None and type(model) is type(model_set.best):
                    proto = _reweighted(first_proto, model)
                if proto is None:
                    try:
                        proto = to_onnx(
                            model, example, SEGMENTER_INPUT, SEGMENTER_OUTPUT, divisor, opset,
                            exporter,
                        )  # fmt: skip
                    except Exception as exc:
                        raise ExportError(f"{label}: conversion failed ({exc})") from exc
                    if first_proto is None:
                        first_proto = copy_proto(proto)
                describe = model.describe() if hasattr(model, "describe") else {}
                metadata = {
                    **common,
                    "role": "segmenter",
                    "candidate_index": index,
                    "epoch": int(meta.get("epoch", -1)),
                    "val_dice": float(meta.get("val_dice", 0.0)),
                    "source": str(meta.get("path", "")),
                    "architecture": str(describe.get("architecture", type(model).__name__)),
                    "segmenter": cfg.segmenter.name,
                    "num_classes": int(getattr(model, "num_classes", len(LABELS))),
                    "softmax_applied": False,
                    "input_name": SEGMENTER_INPUT,
                    "output_name": SEGMENTER_OUTPUT,
                }
                _set_metadata(proto, metadata)
                payload = proto.SerializeToString()
                figures, logits = _check_parity(label, payload, reference, x)
                path = view_dir / f"candidate-{index}.onnx"
                path.write_bytes(payload)
                probabilities.append(torch.softmax(torch.from_numpy(logits), 1).numpy())
                manifest["opset"] = _opset_of(proto)
                entries.append(
                    {
                        "file": f"{view}/{path.name}",
                        "index": index,
                        "epoch": metadata["epoch"],
                        "val_dice": metadata["val_dice"],
                        "source": metadata["source"],
                        "input": SEGMENTER_INPUT,
                        "output": SEGMENTER_OUTPUT,
                        "softmax_applied": False,
                        "sha256": sha256_file(path),
                        "parity": figures,
                    }
                )
                say(_parity_line(label, figures))
            qc = model_set.qc
            qc_module = _qc_export_module(qc)
            qc_inputs = np.concatenate(probabilities).astype(np.float32)
            label = f"{view}/qc.onnx"

            def qc_reference(batch: np.ndarray, qc: Any = qc) -> np.ndarray:
                return qc.reconstruct_tensor(torch.from_numpy(batch)).numpy()

            try:
                proto = to_onnx(
                    qc_module, torch.from_numpy(qc_inputs[:2]), QC_INPUT, QC_OUTPUT,
                    _qc_divisor(size), opset, exporter,
                )  # fmt: skip
            except Exception as exc:
                raise ExportError(f"{label}: conversion failed ({exc})") from exc
            metadata = {
                **common,
                "role": "qc",
                "qc_module": cfg.qc.module.name,
                "qc_input": qc.input,
                "num_classes": int(qc.num_classes),
                "softmax_applied": True,
                "input_name": QC_INPUT,
                "output_name": QC_OUTPUT,
            }
            _set_metadata(proto, metadata)
            payload = proto.SerializeToString()
            figures, _ = _check_parity(label, payload, qc_reference, qc_inputs)
            path = view_dir / "qc.onnx"
            path.write_bytes(payload)
            say(_parity_line(label, figures))
            manifest["views"][view] = {
                "input_size": size,
                "divisor": divisor,
                "spacing_mm": cfg.preprocessing.target_spacing_mm,
                "normalisation": cfg.preprocessing.normalisation,
                "num_classes": int(qc.num_classes),
                "labels": common["labels"],
                "parity_data": parity.describe(),
                "candidates": entries,
                "qc": {
                    "file": f"{view}/qc.onnx",
                    "input": QC_INPUT,
                    "output": QC_OUTPUT,
                    "qc_input": qc.input,
                    "softmax_applied": True,
                    "sha256": sha256_file(path),
                    "parity": figures,
                },
            }
        write_json(staging / MANIFEST, manifest)
        staging.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary folder
        replace_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _qc_divisor(size: int) -> int:
    """The QC autoencoder halves its input down to a 4x4 latent: sizes are multiples of size/4."""
    return max(1, size // 4)


def _opset_of(proto: Any) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _parity_line(label: str, figures: dict[str, Any]) -> str:
    return (
        f"{label}: parity ok: max |diff| {figures['max_abs_diff']:.2e}, argmax agreement "
        f"{100 * figures['argmax_agreement']:.4f} % on {figures['slices']} slices"
    )


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
        metrics: dict[str, float] = {}
        for view, entry in manifest["views"].items():
            for cand in entry["candidates"]:
                prefix = f"parity.{view}.candidate-{cand['index']}"
                metrics[f"{prefix}.max_abs_diff"] = float(cand["parity"]["max_abs_diff"])
                metrics[f"{prefix}.argmax_agreement"] = float(cand["parity"]["argmax_agreement"])
            qc = entry["qc"]["parity"]
            metrics[f"parity.{view}.qc.max_abs_diff"] = float(qc["max_abs_diff"])
            metrics[f"parity.{view}.qc.argmax_agreement"] = float(qc["argmax_agreement"])
        tracker.log_metrics(metrics)
        tracker.log_artifact(str(out), "onnx")
