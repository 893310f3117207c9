"""Model cards: YAML files describing a segmentation model qcloop did not train, so that it runs
exactly as its authors run it.

A card names the model's kind (``onnx``, ``torchscript``, ``torch``, ``nnunet``, or a kind a
plugin registers through ``register_model_kinds``), its file relative to the card, the views it
segments, the input it expects (spacing, size, normalisation) and what it returns (logits,
probabilities or labels, in its own label order). Example::

    kind: torch
    path: weights.pt
    module: monai.networks.nets.UNet
    params: {spatial_dims: 2, in_channels: 1, out_channels: 4, channels: [16, 32], strides: [2]}
    views: [SA]
    input: {spacing_mm: 1.5, size: 256, divisor: 16, normalise: percentile}
    output:
      activation: softmax
      labels: {0: background, 1: RV, 2: MYO, 3: LV}

A card is trusted input, like a configuration file: ``module`` imports a class. Every problem is
a :class:`ModelCardError` naming the card file and the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "LABEL_NAMES",
    "CardInput",
    "CardOutput",
    "ModelCard",
    "ModelCardError",
    "load_card",
]

#: Label names a card may use (lower case) -> qcloop's label (0 bg, 1 LV, 2 MYO, 3 RV).
#: ``ignore`` is a model class qcloop does not use: its probability counts as background.
LABEL_NAMES: dict[str, int] = {
    "background": 0,
    "bg": 0,
    "ignore": 0,
    "lv": 1,
    "myo": 2,
    "myocardium": 2,
    "rv": 3,
}
_STRUCTURES = {1: "LV", 2: "MYO", 3: "RV"}
#: "field: problem", the form of a model validator's message that names its field.
_FIELD_PREFIX = re.compile(r"^([a-z_]+): ")
#: The kinds whose card takes ``module`` (the nn.Module class to build).
_MODULE_KINDS = ("torch",)
#: The kinds whose card takes ``params``: torch (the class's keyword arguments) and nnunet (the
#: predictor's options: folds, checkpoint, tile_step_size, use_gaussian, use_mirroring).
_PARAMS_KINDS = ("torch", "nnunet")


class ModelCardError(ValueError):
    """A model card that cannot be read or used; names the card file and the field.

    Attributes:
        card_path: the card file (``None`` for a card built in memory).
        problems: ``(field, problem)`` pairs, ``field`` dotted (``"output.labels"``).
    """

    def __init__(self, card_path: str | os.PathLike[str] | None, field: str, problem: str) -> None:
        self.card_path = None if card_path is None else Path(card_path)
        self.problems: list[tuple[str, str]] = [(field, problem)]
        super().__init__(self._message())

    @classmethod
    def many(
        cls, card_path: str | os.PathLike[str] | None, problems: Sequence[tuple[str, str]]
    ) -> ModelCardError:
        """One error listing several ``(field, problem)`` pairs."""
        error = cls(card_path, *problems[0])
        error.problems = list(problems)
        error.args = (error._message(),)
        return error

    @property
    def field(self) -> str:
        """The (first) field at fault."""
        return self.problems[0][0]

    def _message(self) -> str:
        where = "model card" if self.card_path is None else str(self.card_path)
        return f"{where}: " + "; ".join(f"{field}: {problem}" for field, problem in self.problems)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CardInput(_Strict):
    """What the model expects as input."""

    spacing_mm: float | None = Field(
        default=None, gt=0, description="In-plane spacing in mm; omitted: the native grid."
    )
    size: int | None = Field(
        default=None, ge=1, description="Square crop/pad size; omitted: padded to the divisor."
    )
    divisor: int = Field(default=1, ge=1, description="Input sizes must be multiples of it.")
    normalise: Literal["zscore", "percentile", "minmax", "none"] = Field(
        default="zscore", description="Intensity normalisation per volume."
    )
    percentiles: tuple[float, float] = Field(
        default=(0.5, 99.5), description="For ``percentile``: the percentiles mapped to 0 and 1."
    )

    @field_validator("percentiles")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"need 0 <= low < high <= 100, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _size_fits_divisor(self) -> CardInput:
        if self.size is not None and self.size % self.divisor:
            raise ValueError(f"size: {self.size} is not a multiple of divisor {self.divisor}")
        return self


class CardOutput(_Strict):
    """What the model returns, and its label order."""

    activation: Literal["softmax", "none", "labels"] = Field(
        default="softmax",
        description="softmax: logits out; none: probabilities out; labels: a label map out.",
    )
    labels: dict[int, str] = Field(
        description="Model class index -> background/bg, LV, MYO/myocardium, RV or ignore."
    )

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, value: dict[int, str]) -> dict[int, str]:
        if sorted(value) != list(range(len(value))):
            raise ValueError(f"class indices must be 0..{len(value) - 1}, got {sorted(value)}")
        unknown = [name for name in value.values() if name.strip().lower() not in LABEL_NAMES]
        if unknown:
            raise ValueError(f"unknown label name(s) {unknown}; use one of {sorted(LABEL_NAMES)}")
        mapped = [LABEL_NAMES[name.strip().lower()] for name in value.values()]
        for label, structure in _STRUCTURES.items():
            count = mapped.count(label)
            if count != 1:
                raise ValueError(
                    f"{structure} missing" if count == 0 else f"{structure} appears {count} times"
                )
        return value

    @property
    def num_classes(self) -> int:
        """How many classes the model outputs."""
        return len(self.labels)


class ModelCard(_Strict):
    """A validated model card. Build it with :func:`load_card` (or :meth:`from_dict`), which
    records the card's file so that ``path`` resolves relative to it."""

    kind: str = Field(min_length=1, description="onnx, torchscript, torch, nnunet or a plugin's.")
    path: str = Field(min_length=1, description="Model file or folder, relative to the card.")
    module: str | None = Field(
        default=None, description="torch only: import path of the nn.Module class."
    )
    params: dict[str, Any] | None = Field(
        default=None,
        description="torch: the class's constructor keyword arguments; nnunet: the predictor's "
        "options (folds, checkpoint, tile_step_size, use_gaussian, use_mirroring).",
    )
    views: tuple[Literal["SA", "LA"], ...] = Field(
        min_length=1, description="The views the model segments."
    )
    input: CardInput = Field(default_factory=CardInput)
    output: CardOutput

    _card_path: Path | None = PrivateAttr(default=None)

    @field_validator("views", mode="before")
    @classmethod
    def _upper_views(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            value = [v.upper() if isinstance(v, str) else v for v in value]
            if len(set(value)) != len(value):
                raise ValueError(f"a view is listed twice: {value}")
        return value

    @model_validator(mode="after")
    def _module_only_for_torch(self) -> ModelCard:
        if self.kind in _MODULE_KINDS:
            if not self.module:
                raise ValueError("module: required for kind torch (the nn.Module class to build)")
        elif self.module is not None:
            raise ValueError(f"module: only for kind torch, not {self.kind!r}")
        if self.params is not None and self.kind not in _PARAMS_KINDS:
            raise ValueError(
                f"params: only for kind torch, not {self.kind!r} (kind nnunet takes it too)"
            )
        return self

    @classmethod
    def from_dict(cls, data: Any, card_path: str | os.PathLike[str] | None = None) -> ModelCard:
        """The card in ``data`` (a parsed YAML mapping), read from ``card_path``."""
        if not isinstance(data, dict):
            raise ModelCardError(
                card_path, "card", f"expected a mapping, got {type(data).__name__}"
            )
        try:
            card = cls.model_validate(data)
        except ValidationError as exc:
            raise ModelCardError.many(card_path, _problems(exc)) from None
        card._card_path = None if card_path is None else Path(card_path)
        return card

    @property
    def card_path(self) -> Path | None:
        """The card's file (``None`` for a card built in memory)."""
        return self._card_path

    @property
    def base_dir(self) -> Path:
        """The folder ``path`` is relative to: the card's folder (the working folder for a card
        built in memory)."""
        return (self._card_path.parent if self._card_path else Path.cwd()).resolve()

    @property
    def resolved_path(self) -> Path:
        """``path`` made absolute relative to the card's folder; it must exist."""
        resolved = (self.base_dir / Path(self.path).expanduser()).resolve()
        if not resolved.exists():
            raise ModelCardError(self._card_path, "path", f"{resolved} does not exist")
        return resolved

    @property
    def module_params(self) -> dict[str, Any]:
        """``params``, empty when not given."""
        return dict(self.params or {})

    def error(self, field: str, problem: str) -> ModelCardError:
        """A :class:`ModelCardError` about ``field`` of this card."""
        return ModelCardError(self._card_path, field, problem)

    def qcloop_index(self) -> np.ndarray:
        """``index[c]`` is qcloop's label (0 bg, 1 LV, 2 MYO, 3 RV) of model class ``c``."""
        labels = self.output.labels
        return np.array(
            [LABEL_NAMES[labels[c].strip().lower()] for c in range(len(labels))], dtype=np.int64
        )

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data (for run.json); :meth:`from_dict` reads it back."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["views"] = list(self.views)
        return data


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    """``(dotted field, message)`` per pydantic error, follow-up errors left out."""
    problems: list[tuple[str, str]] = []
    seen: list[tuple[str, ...]] = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if any(len(other) > len(loc) and other[: len(loc)] == tuple(loc) for other in seen):
            continue  # a follow-up of an error inside this field (an item rejected: too short)
        seen.append(tuple(loc))
        message = str(error["msg"]).removeprefix("Value error, ")
        prefixed = _FIELD_PREFIX.match(message)
        if error["type"] == "value_error" and prefixed:  # a model validator names its field
            loc.append(prefixed.group(1))
            message = message[prefixed.end() :]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append((".".join(loc) or "card", message))
    return problems


def load_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read and validate the model card at ``path`` (YAML, ``yaml.safe_load``)."""
    card_path = Path(path)
    try:
        text = card_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelCardError(card_path, "card", f"cannot read it ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ModelCardError(card_path, "card", f"not valid YAML ({reason})") from exc
    return ModelCard.from_dict(data, card_path)
