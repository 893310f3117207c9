"""Interfaces of the component kinds that plugins provide (small ``typing.Protocol`` classes),
and the plain types that cross the plugin boundary with them.

The core resolves a component by name from the configuration once (through the plugin
registry), then calls it as a plain object: nothing below is dispatched through pluggy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from qcloop.monitor.core.slices import FlaggedSet, SliceSet

if TYPE_CHECKING:  # pragma: no cover
    import torch


@runtime_checkable
class Segmenter(Protocol):
    """A 2D segmentation network (``torch.nn.Module``): 1 channel in, ``num_classes`` logits out.

    In training mode with deep supervision it returns a list of logit maps (full resolution first);
    in eval mode exactly one tensor ``(N, num_classes, H, W)``. ``H`` and ``W`` must be multiples of
    ``divisor``.
    """

    num_classes: int
    in_channels: int
    divisor: int

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]: ...

    def deep_supervision_weights(self) -> list[float]:
        """Loss weight of each output returned in training mode (sums to 1)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Architecture name, widths, depth and parameter count (for logs and model metadata)."""
        ...

    def make_optimizer(
        self, total_epochs: int, lr: float | None = None
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The architecture's reference optimiser and per-epoch learning-rate schedule."""
        ...


@runtime_checkable
class QCModule(Protocol):
    """A quality-control model that reconstructs plausible masks from predicted ones.

    Optional attribute ``needs_image`` (absent = ``False``): an image-aware module sets it, and
    the core then passes the prepared slices ``(N, H, W)`` aligned with the masks, as
    ``fit(..., images=, val_images=)`` and ``reconstruct(probabilities, image=)``. A mask-only
    module never receives them (the paper's autoencoder, and modules written before images).
    """

    input_size: int
    num_classes: int

    def fit(
        self,
        masks: np.ndarray,
        val_masks: np.ndarray | None = None,
        *,
        seed: int = 0,
        log: Any = None,
    ) -> dict[str, Any]:
        """Train on label masks ``(N, H, W)`` (uint8, values 0..num_classes-1); return history.
        An image-aware module also receives ``images=`` and ``val_images=`` ``(N, H, W)``."""
        ...

    def reconstruct(self, probabilities: np.ndarray) -> np.ndarray:
        """Reconstruct ``(N, C, H, W)`` softmax probabilities; returns ``(N, C, H, W)`` probabilities."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Fences(Protocol):
    """Fitted outlier fences: a case fails when :meth:`is_outlier` says so.

    ``phd_high`` is also the upper pHD fence that QC-based selection ranks candidates against
    (a candidate qualifies when its pHD is below it), so every strategy provides one.
    """

    pdc_low: float
    phd_high: float

    def is_outlier(self, pdc: float, phd: float) -> bool: ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; :meth:`ThresholdStrategy.fences_from_dict` reads it back."""
        ...


class ThresholdStrategy(Protocol):
    """Fits fences on a population's quality estimates; keeps no state of its own."""

    def fit(
        self,
        pdc: Sequence[float],
        phd: Sequence[float],
        penalised: Sequence[bool] | None = None,
    ) -> Fences:
        """Fences from one best pDC and pHD (mm) per case; ``penalised`` marks the cases whose
        scores are the empty-mask penalty. Raises ``ValueError`` when no fence can be fitted."""
        ...

    def fences_from_dict(self, data: Mapping[str, Any]) -> Fences:
        """The inverse of ``Fences.to_dict``: fences this strategy wrote, read back (a run
        folder's ``fences.json``). Raises ``ValueError`` on a dict it did not write."""
        ...


class CaseReconstructor(Protocol):
    """The QC module as a refiner sees it: the reconstruction of ONE case's softmax maps
    ``(Z, C, H, W)``, taken in the training pose when pose normalisation is on. A refiner passes
    the case's slices ``(Z, H, W)`` as ``image``; they reach an image-aware QC module only."""

    def reconstruct(
        self, probabilities: np.ndarray, image: np.ndarray | None = None
    ) -> np.ndarray: ...


#: ``still_ood(model)``: how many flagged cases one candidate still leaves outside its fences.
StillOod = Callable[["torch.nn.Module"], int]
#: ``log_metrics(metrics, step)``: figures of one refinement epoch, for the tracker.
MetricsLogger = Callable[[dict[str, float], int], None]


class Refiner(Protocol):
    """Fine-tunes one candidate segmenter in place on the flagged (OoD) cases.

    The core builds one refiner per candidate with ``factory(seed=run seed + candidate index,
    **params)`` (``params`` from ``refinement.refiner``; a ``seed`` there wins), calls
    :meth:`refine` on a copy of the candidate, and saves the refined copies as a new run.
    """

    def refine(
        self,
        model: torch.nn.Module,
        qc: CaseReconstructor,
        flagged: FlaggedSet,
        labeled: SliceSet,
        still_ood: StillOod,
        *,
        log_metrics: MetricsLogger | None = None,
    ) -> dict[str, Any]:
        """Return the history (epochs, losses, OoD counts); ``still_ood(model)`` counts the
        flagged cases this candidate still leaves outside its fences."""
        ...


@runtime_checkable
class Runtime(Protocol):
    """Runs one view's networks: every candidate segmenter and the QC module.

    Arrays are float32, channels first: images ``(Z, S, S)`` (preprocessed slices), softmax maps
    ``(Z, C, S, S)``. Implementations batch the slices and build their sessions once. A factory
    is called as ``factory(run_dir, view, cfg, **params)``; ``params`` come from the caller
    (``threads``, a folder of exported models, ...).

    Optional attribute ``needs_image`` (absent = ``False``): the runtime's QC module reads the
    image, and the core calls ``reconstruct(maps, image=prepared_slices)``.
    """

    #: the registered name (``"torch"``, ``"onnxruntime"``).
    name: str
    #: input size ``S`` and the multiple the network needs (``S % divisor == 0``).
    input_size: int
    divisor: int
    n_candidates: int

    def segment(self, image: np.ndarray) -> list[np.ndarray]:
        """Softmax maps of every candidate (best by validation Dice first)."""
        ...

    def reconstruct(self, probabilities: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """The QC module's reconstruction of a softmax map (same shape). The core passes
        ``image`` (the case's prepared slices) only when the runtime sets ``needs_image``."""
        ...

    def providers(self) -> list[str]:
        """Execution providers / devices actually in use (read back, not requested)."""
        ...


@runtime_checkable
class ExternalModel(Protocol):
    """A segmentation model described by a model card (``monitor/core/model_card.py``), loaded
    by the loader its ``kind`` registers (``register_model_kinds``).

    :meth:`predict` runs the model exactly as its authors do: the caller prepares the slices
    (spacing, crop/pad, normalisation) as the card says, and turns the raw output into
    probabilities in qcloop's label order (activation, label permutation). A model that
    prepares whole cases itself (nnU-Net) may also offer ``predict_case(image_xyz,
    spacing_xyz) -> (X, Y, Z, C)`` raw output on the case's own grid; qcloop then uses it.
    """

    #: the card's kind (``"onnx"``, ``"torchscript"``, ``"torch"``...).
    kind: str
    #: whether :attr:`module` can be fine-tuned (and so refined).
    trainable: bool
    #: the ``torch.nn.Module`` of a trainable kind, else ``None``.
    module: torch.nn.Module | None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """The raw output for float32 slices ``(N, 1, H, W)``: ``(N, C, H, W)`` logits or
        probabilities, or ``(N, H, W)`` labels when the card's activation is ``labels``."""
        ...

    def providers(self) -> list[str]:
        """Execution providers / devices actually in use (read back, not requested)."""
        ...


@dataclass
class ModelRef:
    """One registered model version of one view, with a local run folder holding it."""

    name: str
    view: str
    version: str
    run_dir: Path
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def info(self) -> dict[str, str]:
        """Identity copied into every record under ``"model"``."""
        return {"name": self.name, "version": self.version}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {**asdict(self), "run_dir": str(self.run_dir)}


@dataclass(frozen=True)
class AliasMove:
    """What moving an alias did: the version it points at now, and the one before."""

    ref: ModelRef
    alias: str
    previous_version: str | None

    @property
    def moved(self) -> bool:
        """Whether the alias pointed elsewhere before."""
        return self.previous_version != self.ref.version


@runtime_checkable
class ModelRegistry(Protocol):
    """Registered model versions: one registered model per view (``PREFIX-SA``,
    ``PREFIX-LA``), aliases (``champion``, ``challenger``, ``previous-champion``), lineage tags,
    and local run folders of any version.

    A spec selects versions: ``PREFIX@ALIAS`` (every view), ``PREFIX-SA@ALIAS`` or
    ``PREFIX-SA/3``. Methods raise ``ValueError`` (with the spec, model or version named) for
    what does not exist. The core emits the registered/promoted events around these calls.
    """

    def register(
        self,
        run_dir: Path,
        *,
        name_prefix: str,
        views: Sequence[str] | None = None,
        tags: Mapping[str, str] | None = None,
        view_tags: Mapping[str, Mapping[str, str]] | None = None,
    ) -> dict[str, ModelRef]:
        """A new version per view of a run folder, complete (files, tags) before it returns;
        moves no alias."""
        ...

    def find(self, run_dir: Path, *, name_prefix: str) -> dict[str, ModelRef]:
        """The versions already holding exactly this run folder's files, per view."""
        ...

    def resolve(self, spec: str) -> dict[str, ModelRef]:
        """View -> the version ``spec`` selects, with a verified local run folder."""
        ...

    def alias_versions(self, spec: str) -> dict[str, str]:
        """View -> version ``spec`` selects now (cheap: no download; services poll it)."""
        ...

    def set_alias(self, name: str, version: str, alias: str) -> AliasMove:
        """Move ``alias`` to ``version``; the version it leaves gets ``previous-<alias>``."""
        ...

    def rollback(self, name: str) -> AliasMove:
        """Move ``champion`` back to the version it replaced."""
        ...

    def set_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        """Add or overwrite tags of one version (the promotion gate records its verdict)."""
        ...

    def list_versions(self, name_prefix: str | None = None) -> list[dict[str, Any]]:
        """Every version: name, version, aliases, status, tags and gate verdict, newest first."""
        ...

    def get_version(self, name: str, version: str) -> dict[str, Any]:
        """One version as :meth:`list_versions` describes it."""
        ...


class Tracker(Protocol):
    """Experiment tracking: runs with params, metrics and artifacts."""

    def start_run(
        self, name: str, tags: dict[str, str] | None = None
    ) -> AbstractContextManager[Any]: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """Runs the per-case work of ``assess`` and ``predict`` over many cases: in this process
    (``local``) or spread over workers (``ray``). A factory is called as ``factory(**params)``
    (``address``, ``workers``, ``num_gpus_per_worker``, ``batch_size`` from the command line).

    Every worker scores with ``qcloop.monitor.method.case_worker.ViewScorer``, so records are
    the same whatever the engine. Used as a context manager: a cluster the engine started is
    stopped on exit.
    """

    #: the registered name (``"local"``, ``"ray"``).
    name: str

    def outcomes(self, job: Any, sources: Sequence[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        """One outcome per source, in the sources' order: ``("record", record)`` or
        ``("skipped", {"path", "reason"})``; ``job`` is a ``ViewJob``, sources ``CaseSource``."""
        ...

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class QualityCalibrator(Protocol):
    """Maps a case's QC signals to an estimate of one true score (Dice, or HD in mm) of one
    structure, fitted on reference cases where ground truth exists. A factory is called as
    ``factory(**params)``; the core fits one calibrator per view, structure and target.

    ``features`` is ``(n, k)``: column 0 is the primary signal, which rises with the target
    (pDC for Dice, pHD for HD); the other columns are further signals (in
    ``qcloop.monitor.method.quality_estimate.FEATURES``). The core wraps every calibrator with
    cross-fitted conformal intervals, clipping and the fallback to pDC: a calibrator only
    predicts points.
    """

    def fit(self, features: np.ndarray, target: np.ndarray) -> None:
        """Fit on ``n`` reference cases (finite values, ``n`` >= the core's minimum)."""
        ...

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Point estimates ``(n,)`` for ``features`` ``(n, k)``."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """The fitted state as JSON-serialisable data (stored in the run folder)."""
        ...

    def load_dict(self, data: Mapping[str, Any]) -> None:
        """Restore the state :meth:`to_dict` wrote."""
        ...
