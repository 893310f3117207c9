"""Models qcloop did not train, run as their model cards say: probabilities in qcloop's label
order on a case's original grid, and on the grid of qcloop's own QC module.

:func:`load_card_model` reads a card (``monitor/core/model_card.py``), loads its model through
the loader its ``kind`` registers (``register_model_kinds``) and returns a
:class:`CardPredictor`. The predictor prepares a case as the card says (spacing, crop/pad,
normalisation), runs the model slice batch by slice batch, turns its raw output into
probabilities (softmax, probabilities as they are, or one-hot labels), permutes the classes to
qcloop's order (0 bg, 1 LV, 2 MYO, 3 RV; extra classes count as background) and restores them to
the case's original grid. The QC module then takes them onto its own grid
(:meth:`CardPredictor.net_probabilities`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from qcloop.monitor.core.interfaces import ExternalModel
from qcloop.monitor.core.model_card import ModelCard, ModelCardError, load_card
from qcloop.monitor.core.plugin_manager import get_plugin_manager
from qcloop.monitor.data.case import Case, CaseError
from qcloop.monitor.data.preprocess import Preprocessor, PreprocessTransform

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.plugin_manager import QcloopPluginManager

__all__ = ["SUM_TOLERANCE", "CardPredictor", "load_card_model"]

#: How far the class probabilities of an ``activation: none`` model may sum from 1.
SUM_TOLERANCE = 1e-3
_NUM_LABELS = 4
#: Side of the synthetic slices of a dry run when the card fixes no size (rounded up to the
#: card's divisor).
_DRY_RUN_SIZE = 96


class _OutputProblem(Exception):
    """The model's output does not fit its card: which field, and why."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1, numerically safe, float32."""
    out = logits.astype(np.float32, copy=True)
    out -= out.max(axis=1, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out


def _label_probabilities(raw: np.ndarray, classes: int, shape: tuple[int, ...]) -> np.ndarray:
    """One-hot ``(N, classes, H, W)`` maps of a label output ``(N, H, W)`` (or ``(N, 1, H, W)``)."""
    labels = raw[:, 0] if raw.ndim == 4 and raw.shape[1] == 1 else raw
    if labels.shape != shape:
        raise _OutputProblem(
            "output.activation",
            f"a label map of shape {raw.shape} for {shape[0]} slices of {shape[1:]}; "
            f"activation 'labels' expects (N, H, W)",
        )
    if not np.all(np.isfinite(labels)):
        raise _OutputProblem("path", "the model returned NaN or inf")
    values = np.unique(labels)
    if np.any(values != np.round(values)) or values.min() < 0 or values.max() >= classes:
        raise _OutputProblem(
            "output.labels",
            f"the model returned labels {values[:8].tolist()}; output.labels lists 0..{classes - 1}",
        )
    ints = labels.astype(np.int64)
    return (ints[:, None] == np.arange(classes).reshape(1, -1, 1, 1)).astype(np.float32)


def _model_probabilities(raw: np.ndarray, card: ModelCard, shape: tuple[int, ...]) -> np.ndarray:
    """``(N, C, H, W)`` probabilities in the model's label order from its raw output for
    ``shape = (N, H, W)`` slices."""
    classes = card.output.num_classes
    raw = np.asarray(raw)
    if card.output.activation == "labels":
        return _label_probabilities(raw, classes, shape)
    n, h, w = shape
    if raw.ndim != 4 or raw.shape[0] != n or raw.shape[2:] != (h, w):
        raise _OutputProblem(
            "path",
            f"the model returned shape {raw.shape} for input {(n, 1, h, w)}; expected "
            f"({n}, {classes}, {h}, {w})",
        )
    if raw.shape[1] != classes:
        raise _OutputProblem(
            "output.labels",
            f"the model returns {raw.shape[1]} classes; output.labels lists {classes}",
        )
    if not np.all(np.isfinite(raw)):
        raise _OutputProblem("path", "the model returned NaN or inf")
    if card.output.activation == "softmax":
        return _softmax(raw)
    probs = raw.astype(np.float32)
    sums = probs.sum(axis=1)
    if probs.min() < -SUM_TOLERANCE or np.abs(sums - 1.0).max() > SUM_TOLERANCE:
        raise _OutputProblem(
            "output.activation",
            f"'none' says the model returns probabilities, but its class sums range "
            f"{sums.min():.4g}..{sums.max():.4g} (minimum {probs.min():.4g}); "
            "logits need 'softmax'",
        )
    return probs


def _to_qcloop(probs: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Model-order probabilities ``(N, C, H, W)`` in qcloop's order ``(N, 4, H, W)``; classes
    sharing a qcloop label (extra classes on background) are summed."""
    out = np.zeros((probs.shape[0], _NUM_LABELS, *probs.shape[2:]), dtype=np.float32)
    for model_class, label in enumerate(index):
        out[:, label] += probs[:, model_class]
    return out


class CardPredictor:
    """A model card's model, run on cases: probabilities in qcloop's label order.

    Attributes:
        card: the validated card.
        model: the loaded model (``predict(batch)``, ``providers()``).
        views: the views the card says the model segments.
        trainable: whether the model can be fine-tuned (``model.module`` is an ``nn.Module``).
        preprocessor: the preparation the card asks for.
        batch_size: slices per call of ``model.predict``.
    """

    def __init__(self, card: ModelCard, model: ExternalModel, *, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.card = card
        self.model = model
        self.views: tuple[str, ...] = tuple(card.views)
        self.trainable = bool(model.trainable)
        self.batch_size = int(batch_size)
        spec = card.input
        self.preprocessor = Preprocessor(
            spec.size,
            target_spacing=spec.spacing_mm,
            divisor=spec.divisor,
            normalisation=spec.normalise,
            percentiles=spec.percentiles,
        )
        self._index = card.qcloop_index()

    def __repr__(self) -> str:
        where = self.card.card_path or "in-memory card"
        return f"CardPredictor({self.card.kind!r}, {str(where)!r}, views={list(self.views)})"

    @property
    def _name(self) -> str:
        return f"model card {self.card.card_path or '(in memory)'}"

    def slice_probabilities(self, slices: np.ndarray) -> np.ndarray:
        """qcloop-order probabilities ``(Z, 4, H, W)`` of prepared slices ``(Z, H, W)``.

        Raises:
            _OutputProblem: the output does not fit the card; anything the model raises.
        """
        slices = np.asarray(slices, dtype=np.float32)
        out = np.empty((slices.shape[0], _NUM_LABELS, *slices.shape[1:]), dtype=np.float32)
        for start in range(0, slices.shape[0], self.batch_size):
            batch = np.ascontiguousarray(slices[start : start + self.batch_size, None])
            raw = self.model.predict(batch)
            probs = _model_probabilities(raw, self.card, (batch.shape[0], *batch.shape[2:]))
            out[start : start + batch.shape[0]] = _to_qcloop(probs, self._index)
        return out

    def original_probabilities(self, case: Case) -> np.ndarray:
        """float32 ``(X, Y, Z, 4)`` probabilities in qcloop's label order on the case's grid.

        Raises:
            CaseError: the case's view is not the card's, or the model failed on it or
                returned what its card does not describe (NaN, wrong shape or classes).
        """
        if case.view not in self.views:
            raise CaseError(
                case.source.image_path,
                f"{self._name} segments {', '.join(self.views)}, not {case.view}",
                key=case.key,
            )
        predict_case = getattr(self.model, "predict_case", None)
        if callable(predict_case):
            return self._case_probabilities(case, predict_case)
        slices, transform = self.preprocessor.prepare_image(case.image, case.spacing)
        try:
            probs = self.slice_probabilities(slices)
        except _OutputProblem as problem:
            raise CaseError(
                case.source.image_path, f"{self._name}: {problem.field}: {problem}", key=case.key
            ) from None
        except Exception as exc:
            raise CaseError(
                case.source.image_path,
                f"{self._name}: the {self.card.kind} model failed on slices of "
                f"{slices.shape[1]}x{slices.shape[2]} ({_short(exc)})",
                key=case.key,
            ) from exc
        return transform.restore_probabilities(probs)

    def _case_probabilities(
        self, case: Case, predict_case: Callable[..., np.ndarray]
    ) -> np.ndarray:
        """qcloop-order ``(X, Y, Z, 4)`` probabilities from a model that runs whole cases on
        their own grid and prepares them itself (``predict_case(image, spacing) -> (X, Y, Z,
        C)``, e.g. nnU-Net's predictor)."""
        x, y, z = case.image.shape
        try:
            raw = np.asarray(predict_case(case.image, case.spacing))
            if raw.ndim != 4 or raw.shape[:3] != (x, y, z):
                raise _OutputProblem(
                    "path",
                    f"the model returned shape {raw.shape} for a case of {(x, y, z)}; "
                    f"expected ({x}, {y}, {z}, C)",
                )
            zcxy = np.ascontiguousarray(np.transpose(raw, (2, 3, 0, 1)))
            probs = _to_qcloop(_model_probabilities(zcxy, self.card, (z, x, y)), self._index)
        except _OutputProblem as problem:
            raise CaseError(
                case.source.image_path, f"{self._name}: {problem.field}: {problem}", key=case.key
            ) from None
        except Exception as exc:
            raise CaseError(
                case.source.image_path,
                f"{self._name}: the {self.card.kind} model failed on the case ({_short(exc)})",
                key=case.key,
            ) from exc
        return np.ascontiguousarray(np.transpose(probs, (2, 3, 0, 1)))

    def net_probabilities(self, case: Case, transform: PreprocessTransform) -> np.ndarray:
        """float32 ``(Z, 4, S, S)`` probabilities on ``transform``'s grid (qcloop's QC module's
        preparation of the same case)."""
        return transform.apply_probabilities(self.original_probabilities(case))

    def check(self, example_case: Case | None = None) -> None:
        """A dry run before any case is scored: the whole path on ``example_case``, or the
        model alone on synthetic slices of the card's input size.

        Raises:
            ModelCardError: (synthetic input) the model fails or returns what its card does
                not describe; the field at fault is named.
            CaseError: (``example_case``) as :meth:`original_probabilities`.
        """
        if example_case is not None:
            self.original_probabilities(example_case)
            return
        slices = self._synthetic_slices()
        size_field = "input.size" if self.card.input.size else "input.divisor"
        try:
            self.slice_probabilities(slices)
        except _OutputProblem as problem:
            raise self.card.error(problem.field, f"dry run: {problem}") from None
        except Exception as exc:
            raise self.card.error(
                size_field,
                f"dry run: the {self.card.kind} model failed on a batch of shape "
                f"{(slices.shape[0], 1, *slices.shape[1:])} ({_short(exc)})",
            ) from exc

    def _synthetic_slices(self) -> np.ndarray:
        """Two ``(S, S)`` slices of a bright disc on a dark ground, normalised as the card says."""
        divisor = self.card.input.divisor
        size = self.card.input.size or -(-_DRY_RUN_SIZE // divisor) * divisor
        grid = np.linspace(-1.0, 1.0, size, dtype=np.float64)
        radius = np.hypot(*np.meshgrid(grid, grid, indexing="ij"))
        volume = np.stack([1000.0 * (radius < 0.4) + 100.0, 800.0 * (radius < 0.3) + 50.0], -1)
        return np.moveaxis(self.preprocessor.normalise(volume), 2, 0)


def _short(exc: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_card_model(
    card: ModelCard | str | os.PathLike[str],
    *,
    pm: QcloopPluginManager | None = None,
    batch_size: int = 8,
) -> CardPredictor:
    """A :class:`CardPredictor` for a card (or the card file at a path), its model loaded by
    the loader its kind registers.

    Raises:
        ModelCardError: the card is invalid, its kind is not registered (the registered ones
            are listed), or its loader rejects a field.
        MissingExtraError: the kind needs an extra that is not installed (named).
    """
    if not isinstance(card, ModelCard):
        card = load_card(card)
    kinds = (pm or get_plugin_manager()).model_kinds()
    if card.kind not in kinds:
        registered = ", ".join(kinds.names()) or "none"
        raise card.error("kind", f"unknown model kind {card.kind!r} (registered: {registered})")
    model = kinds[card.kind].factory(card)
    if not isinstance(model, ExternalModel):
        raise ModelCardError(
            card.card_path,
            "kind",
            f"the loader of kind {card.kind!r} (plugin {kinds.plugin_of(card.kind)}) returned "
            f"{type(model).__name__}, not an ExternalModel",
        )
    return CardPredictor(card, model, batch_size=batch_size)
