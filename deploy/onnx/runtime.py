"""The ``onnxruntime`` runtime: :class:`OrtRuntime` runs an export of ``qcloop export-onnx``.

It implements the ``Runtime`` protocol of :mod:`qcloop.monitor.core.interfaces`: one session per
model, built once; slices run in batches; softmax is applied to the segmenters' logits in place.

Providers: by default the CUDA execution provider is asked for only when ONNX Runtime lists it
AND a probe session really runs on it (onnxruntime-gpu lists CUDA even on machines without a
GPU, then falls back to the CPU with an error on its log). Explicitly requested CUDA that does
not load falls back to the CPU with one warning. The providers in use are read back from the
sessions (``providers()``), never assumed from the request.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.deploy.onnx.errors import ExportError
from qcloop.deploy.onnx.manifest import MANIFEST, load_manifest
from qcloop.monitor.core.atomic import sha256_file

log = logging.getLogger(__name__)

__all__ = [
    "CPU",
    "CUDA",
    "OrtRuntime",
    "cuda_usable",
    "resolve_providers",
    "runtime_for_run",
]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_SHORT_NAMES = {"cuda": CUDA, "gpu": CUDA, "cpu": CPU}
#: ONNX Runtime's default logger severity (2: warning); restored after quiet session creation.
_DEFAULT_SEVERITY = 2


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """Raise ONNX Runtime's default log severity to fatal-only (4) while sessions are built: a
    CUDA provider that cannot load otherwise prints an error line per session (severity 3 still
    lets those through). Real failures still raise."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_DEFAULT_SEVERITY)


def _probe_model() -> bytes:
    """A one-node float model (Relu), for checking that a provider really loads."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """Whether the CUDA execution provider is listed AND a session really runs on it."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return False
    try:
        with _quiet_ort():
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(_probe_model(), options, providers=[CUDA, CPU])
        return CUDA in session.get_providers()
    except Exception as exc:  # a broken CUDA install raises instead of falling back
        log.debug("CUDA provider probe failed: %s", exc)
        return False


def resolve_providers(providers: Sequence[str] | str | None = None) -> list[str]:
    """The providers to ask for: ``None`` means CUDA when it really loads, else CPU. Names may be
    short (``"cuda"``, ``"cpu"``); the CPU provider is always appended as the fallback."""
    if providers is None:
        return [CUDA, CPU] if cuda_usable() else [CPU]
    items = [providers] if isinstance(providers, str) else list(providers)
    if not items:
        raise ValueError("providers: empty list; leave it out to choose automatically")
    resolved: list[str] = []
    for item in items:
        name = _SHORT_NAMES.get(str(item).lower(), str(item))
        if name not in resolved:
            resolved.append(name)
    if CPU not in resolved:
        resolved.append(CPU)
    return resolved


def _softmax_into(logits: np.ndarray, out: np.ndarray) -> None:
    """Softmax over axis 1 of ``logits`` written into ``out`` (same shape), numerically safe."""
    np.subtract(logits, logits.max(axis=1, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class _ViewExport:
    """One view's models as the manifest lists them: files (candidates then the QC module),
    their digests, and the shapes they work on."""

    input_size: int
    divisor: int
    num_classes: int
    files: list[str]
    digests: list[str | None]
    #: per candidate, the card of a model qcloop did not train (``qcloop calibrate``), or None
    cards: list[str | None]

    @classmethod
    def read(cls, root: Path, view: str) -> _ViewExport:
        manifest = load_manifest(root)
        where = root / MANIFEST
        entry = manifest["views"].get(view)
        if entry is None:
            raise ExportError(
                f"{where}: no {view} models in this export (views: {sorted(manifest['views'])})"
            )
        try:
            candidates, qc = entry["candidates"], entry["qc"]
            found = cls(
                input_size=int(entry["input_size"]),
                divisor=int(entry["divisor"]),
                num_classes=int(entry["num_classes"]),
                files=[c["file"] for c in candidates] + [qc["file"]],
                digests=[c.get("sha256") for c in candidates] + [qc.get("sha256")],
                cards=[c.get("card") for c in candidates],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{where}: view {view}: malformed entry ({exc})") from exc
        if not found.files[:-1]:
            raise ExportError(f"{where}: view {view} lists no candidate segmenter")
        return found


def _session_options(threads: int | None) -> Any:
    """Session options: all graph optimisations, ``threads`` intra-op threads (ONNX Runtime's
    default when ``None``) that do not spin when idle."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        # several sessions share the cores (serve workers): idle threads must not spin
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _open_session(
    path: Path, digest: str | None, options: Any, providers: list[str], where: Path
) -> Any:
    """A session of the model file ``path``, checked against its digest in manifest ``where``."""
    import onnxruntime as ort

    if not path.is_file():
        raise ExportError(f"{path}: missing (listed in {where})")
    if digest and sha256_file(path) != digest:
        raise ExportError(f"{path}: changed since the export (sha256 differs from {where})")
    try:
        with _quiet_ort():
            return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        raise ExportError(f"{path}: ONNX Runtime cannot load it ({exc})") from exc


def _check_session(
    path: Path, session: Any, view: str, role: str, size: int, num_classes: int
) -> None:
    """The session's metadata and signature fit the manifest's view, role and sizes."""
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("view") != view:
        raise ExportError(f"{path}: metadata view is {meta.get('view')!r}, expected {view!r}")
    if meta.get("role") != role:
        raise ExportError(f"{path}: metadata role is {meta.get('role')!r}, expected {role!r}")
    if meta.get("input_size") != str(size):
        raise ExportError(
            f"{path}: metadata input_size is {meta.get('input_size')!r}, the manifest says {size}"
        )
    inputs, outputs = session.get_inputs(), session.get_outputs()
    channels = 1 if role == "segmenter" else num_classes
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(f"{path}: expected one input and one output")
    shape = inputs[0].shape
    if len(shape) != 4 or shape[1] != channels:
        raise ExportError(f"{path}: input shape {shape}, expected (N, {channels}, H, W)")
    if inputs[0].type != "tensor(float)" or outputs[0].type != "tensor(float)":
        raise ExportError(f"{path}: expected float32 input and output")


class OrtRuntime:
    """The ``Runtime`` protocol on ONNX Runtime sessions of one view.

    Build it with :meth:`from_export`. Arrays are float32, channels first: images ``(Z, S, S)``,
    softmax maps ``(Z, C, S, S)``.
    """

    name = "onnxruntime"

    def __init__(
        self,
        view: str,
        segmenters: Sequence[Any],
        qc: Any,
        *,
        input_size: int,
        divisor: int,
        num_classes: int,
        batch_size: int = 16,
        files: Sequence[str] = (),
        requested: Sequence[str] = (CPU,),
    ) -> None:
        if not segmenters:
            raise ValueError(f"{view}: no segmenter session")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.view = view
        self.sessions = list(segmenters)
        self.qc_session = qc
        self.input_size = int(input_size)
        self.divisor = int(divisor)
        self.num_classes = int(num_classes)
        self.n_candidates = len(self.sessions)
        self.batch_size = int(batch_size)
        self.files = list(files)
        self.requested = list(requested)
        self._io = [(s.get_inputs()[0].name, s.get_outputs()[0].name) for s in self.sessions]
        #: per candidate, a model card's predictor on its session (run on the original case)
        self.cards: list[Any] = [None] * len(self.sessions)
        self._qc_io = (qc.get_inputs()[0].name, qc.get_outputs()[0].name)

    @classmethod
    def from_export(
        cls,
        onnx_dir: str | Path,
        view: str,
        *,
        providers: Sequence[str] | str | None = None,
        batch_size: int = 16,
        threads: int | None = None,
    ) -> OrtRuntime:
        """Sessions for ``view`` of the export in ``onnx_dir`` (``qcloop export-onnx``).

        Args:
            providers: execution providers to ask for (``None``: CUDA when it really loads,
                else CPU); a requested CUDA that fails to load falls back to CPU with a warning.
            batch_size: slices per session call.
            threads: intra-op threads per session (``None``: ONNX Runtime's default).

        Raises:
            ExportError: the manifest or a model file is missing, unreadable, modified since
                the export, or describes another view or input size.
        """
        root = Path(onnx_dir)
        export = _ViewExport.read(root, view)
        wanted = resolve_providers(providers)
        options = _session_options(threads)
        sessions = []
        for index, (rel, digest) in enumerate(zip(export.files, export.digests, strict=True)):
            path = root / rel
            role = "qc" if index == len(export.files) - 1 else "segmenter"
            session = _open_session(path, digest, options, wanted, root / MANIFEST)
            if role == "qc" or export.cards[index] is None:
                _check_session(path, session, view, role, export.input_size, export.num_classes)
            sessions.append(session)
        runtime = cls(
            view, sessions[:-1], sessions[-1], input_size=export.input_size,
            divisor=export.divisor, num_classes=export.num_classes, batch_size=batch_size,
            files=[str(root / f) for f in export.files], requested=wanted,
        )  # fmt: skip
        runtime.cards = [
            _card_predictor(root / card, session) if card else None
            for card, session in zip(export.cards, sessions, strict=False)
        ]
        runtime._log_providers()
        return runtime

    def _log_providers(self) -> None:
        active = self.providers()
        if CUDA in self.requested and CUDA not in active:
            log.warning(
                "%s: CUDAExecutionProvider was requested but did not load (no usable GPU or "
                "CUDA libraries); running on %s",
                self.view,
                ", ".join(active),
            )
        log.info("%s: ONNX Runtime providers in use: %s", self.view, ", ".join(active))

    # ------------------------------------------------------------------ Runtime protocol

    def _check_image(self, image: np.ndarray) -> np.ndarray:
        s = self.input_size
        if image.ndim != 3 or image.shape[1:] != (s, s):
            raise ValueError(f"{self.view}: expected slices (Z, {s}, {s}), got {image.shape}")
        return np.ascontiguousarray(image, dtype=np.float32)  # no copy when already so

    def segment(self, image: np.ndarray, origin: Any = None) -> list[np.ndarray]:
        """Softmax maps ``(Z, C, S, S)`` of every candidate (best first). qcloop's own
        candidates run on the prepared slices; a model card's runs on ``origin`` (the original
        case and its transform) as its card says."""
        x = self._check_image(np.asarray(image))[:, None]
        z, s, c, b = len(x), self.input_size, self.num_classes, self.batch_size
        results = []
        for session, (in_name, out_name), card in zip(
            self.sessions, self._io, self.cards, strict=True
        ):
            if card is not None:
                if origin is None:
                    raise ValueError(f"{self.view}: a model-card candidate needs the original case")
                results.append(card.net_probabilities(*origin))
                continue
            out = np.empty((z, c, s, s), np.float32)
            for i in range(0, z, b):
                (logits,) = session.run([out_name], {in_name: x[i : i + b]})
                _softmax_into(logits, out[i : i + b])
            results.append(out)
        return results

    def reconstruct(self, probabilities: np.ndarray) -> np.ndarray:
        """The QC module's reconstruction ``(Z, C, S, S)`` of softmax maps (same shape)."""
        s, c = self.input_size, self.num_classes
        p = np.asarray(probabilities)
        if p.ndim != 4 or p.shape[1:] != (c, s, s):
            raise ValueError(
                f"{self.view}: expected (Z, {c}, {s}, {s}) probabilities, got {p.shape}"
            )
        p = np.ascontiguousarray(p, dtype=np.float32)
        in_name, out_name = self._qc_io
        out = np.empty_like(p)
        for i in range(0, len(p), self.batch_size):
            (out[i : i + self.batch_size],) = self.qc_session.run(
                [out_name], {in_name: p[i : i + self.batch_size]}
            )
        return out

    def providers(self) -> list[str]:
        """Execution providers the sessions actually use (read back; the same for all)."""
        seen: list[str] = []
        for session in [*self.sessions, self.qc_session]:
            for name in session.get_providers():
                if name not in seen:
                    seen.append(name)
        return seen

    def describe(self) -> dict[str, Any]:
        """View, model files, requested and active providers, for logs and service metadata."""
        return {
            "runtime": self.name,
            "view": self.view,
            "files": list(self.files),
            "requested_providers": list(self.requested),
            "providers": self.providers(),
            "input_size": self.input_size,
            "batch_size": self.batch_size,
        }


def _card_predictor(card_path: Path, session: Any) -> Any:
    """A model card of an export run on its already opened (and digest-checked) session."""
    from qcloop.deploy.onnx.card_model import OnnxCardModel
    from qcloop.monitor.core.model_card import ModelCardError, load_card
    from qcloop.monitor.method.external import CardPredictor

    try:
        return CardPredictor(load_card(card_path), OnnxCardModel(session))
    except ModelCardError as exc:
        raise ExportError(str(exc)) from exc


def runtime_for_run(
    run_dir: Path,
    view: str,
    cfg: Any,
    *,
    onnx_dir: str | Path | None = None,
    threads: int | None = None,
    **params: Any,
) -> OrtRuntime:
    """The ``onnxruntime`` runtime of ``view``: the ONNX models in ``onnx_dir`` (default
    ``RUN/onnx``), ``threads`` intra-op threads per session (ONNX Runtime's default when
    ``None``); other ``params`` (``providers``, ``batch_size``) go to
    :meth:`OrtRuntime.from_export`.

    Raises:
        ExportError: the folder holds no export (the message says how to make one), or the
            export cannot be used.
    """
    run_dir = Path(run_dir)
    folder = Path(onnx_dir) if onnx_dir is not None else run_dir / "onnx"
    if not (folder / MANIFEST).is_file():
        out = "" if folder == run_dir / "onnx" else f" --out {folder}"
        raise ExportError(
            f"{folder}: no ONNX export ({MANIFEST} missing); run "
            f"`qcloop export-onnx --run {run_dir}{out}` first"
        )
    return OrtRuntime.from_export(folder, view, threads=threads, **params)
