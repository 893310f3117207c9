"""Built-in plugin: the ``nnunet`` model kind of model cards, a trained nnU-Net v2 model.

The card's ``path`` is the trained model folder nnU-Net writes
(``nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION``, holding ``dataset.json``,
``plans.json`` and ``fold_N/checkpoint_final.pth``); nnU-Net's own predictor
(``nnUNetPredictor``) runs it, with its own preprocessing (normalisation, resampling to the
plans' spacing) and sliding-window inference, and returns probabilities. So the card says
``input: {normalise: none}`` with no spacing or size, and ``output: {activation: none}``::

    kind: nnunet
    path: Dataset027_ACDC/nnUNetTrainer__nnUNetPlans__2d
    params: {folds: [0], checkpoint: checkpoint_final.pth, use_mirroring: false}
    views: [SA]
    input: {normalise: none}
    output:
      activation: none
      labels: {0: background, 1: RV, 2: MYO, 3: LV}

``params`` (all optional): ``folds`` (default: every ``fold_N`` holding the checkpoint; more
than one is an ensemble), ``checkpoint`` (``checkpoint_final.pth``), ``tile_step_size`` (0.5),
``use_gaussian`` (true), ``use_mirroring`` (true: nnU-Net's test-time mirroring).

Checkpoints load with ``torch.load(weights_only=True)`` (numpy scalars allowed), never as
arbitrary pickles. :meth:`NnunetCardModel.predict_case` runs a whole case on its own grid, as
nnU-Net does; :meth:`NnunetCardModel.predict` runs prepared slices as a stack already on the
model's grid (no resampling). Images reach nnU-Net in SimpleITK's axis order (z, y, x), as its
default readers (``SimpleITKIO``, ``NibabelIO``) load the files; a model trained with a
reorienting reader is refused. CUDA when available, else the CPU. Needs the ``nnunet`` extra.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qcloop.monitor import hookimpl
from qcloop.monitor.core.hookspecs import Register
from qcloop.monitor.core.model_card import LABEL_NAMES, ModelCard, ModelCardError
from qcloop.monitor.core.optional import require

__all__ = ["NnunetCardModel", "NnunetParams", "load_nnunet", "nnunet_params"]

_FEATURE = "nnU-Net v2 model cards (kind: nnunet)"


class NnunetParams(BaseModel):
    """The ``params`` of an ``nnunet`` card: which checkpoints, and nnU-Net's inference options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    folds: tuple[Annotated[int, Field(ge=0)] | Literal["all"], ...] | None = Field(
        default=None,
        min_length=1,
        description="Folds to ensemble (fold_N folders, or 'all'); omitted: every one found.",
    )
    checkpoint: str = Field(
        default="checkpoint_final.pth", min_length=1, description="Checkpoint file in each fold."
    )
    tile_step_size: float = Field(default=0.5, gt=0.0, le=1.0, description="Sliding-window step.")
    use_gaussian: bool = Field(default=True, description="Gaussian weighting of the tiles.")
    use_mirroring: bool = Field(default=True, description="Test-time mirroring.")

    @field_validator("folds", mode="before")
    @classmethod
    def _one_fold(cls, value: Any) -> Any:
        """``folds: 0`` is ``folds: [0]``."""
        return [value] if isinstance(value, int | str) else value

    @field_validator("checkpoint")
    @classmethod
    def _file_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or value in (".", ".."):
            raise ValueError(f"a file name inside each fold folder, got {value!r}")
        return value


def nnunet_params(card: ModelCard) -> NnunetParams:
    """The card's validated ``params``.

    Raises:
        ModelCardError: a parameter is unknown or invalid (``params.<name>``).
    """
    try:
        return NnunetParams.model_validate(card.module_params)
    except ValidationError as exc:
        problems = [
            (".".join(["params", *(str(p) for p in err["loc"][:1])]), _pydantic_message(err))
            for err in exc.errors()
        ]
        raise ModelCardError.many(card.card_path, problems) from None


def _short(exc: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pydantic_message(error: Any) -> str:
    """A pydantic error's message, as a card problem."""
    if error["type"] == "extra_forbidden":
        return "unknown parameter (folds, checkpoint, tile_step_size, use_gaussian, use_mirroring)"
    return str(error["msg"]).removeprefix("Value error, ")


class NnunetCardModel:
    """An ``ExternalModel`` over an initialised ``nnUNetPredictor`` (inference only).

    Attributes:
        predictor: nnU-Net's predictor, its weights loaded.
        folder: the trained model folder.
        folds: the folds it ensembles.
        configuration: the nnU-Net configuration (``2d``, ``3d_fullres``...).
    """

    kind = "nnunet"
    trainable = False
    module = None

    def __init__(
        self, predictor: Any, folder: Path, folds: tuple[int | str, ...], configuration: str
    ) -> None:
        self.predictor = predictor
        self.folder = folder
        self.folds = folds
        self.configuration = configuration
        self._model_grid_spacing = _model_grid_spacing(predictor)

    def __repr__(self) -> str:
        return f"NnunetCardModel({str(self.folder)!r}, folds={list(self.folds)})"

    def predict_case(
        self, image: np.ndarray, spacing: tuple[float, float, float] | list[float]
    ) -> np.ndarray:
        """float32 ``(X, Y, Z, C)`` probabilities, in the model's label order, of an ``(X, Y, Z)``
        volume with voxel ``spacing`` (mm, x y z), on the same grid: nnU-Net's whole path."""
        volume = np.asarray(image, dtype=np.float32)
        if volume.ndim != 3:
            raise ValueError(f"an (X, Y, Z) volume is needed, got shape {volume.shape}")
        if len(spacing) != 3:
            raise ValueError(f"spacing needs 3 values (x, y, z), got {list(spacing)}")
        # nnU-Net's axis order is SimpleITK's: (z, y, x), spacing likewise
        zyx = np.ascontiguousarray(volume.transpose(2, 1, 0))[None]
        probs = self._run(zyx, [float(s) for s in reversed(tuple(spacing))])
        return np.ascontiguousarray(probs.transpose(3, 2, 1, 0))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``(N, C, H, W)`` probabilities of float32 slices ``(N, 1, H, W)``, run as one stack
        taken to be on the model's own grid (its plans' spacing: no resampling)."""
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1] != 1:
            raise ValueError(f"slices of shape (N, 1, H, W) are needed, got {batch.shape}")
        zyx = np.ascontiguousarray(batch[:, 0].transpose(0, 2, 1))[None]
        probs = self._run(zyx, self._model_grid_spacing)
        return np.ascontiguousarray(probs.transpose(1, 0, 3, 2))

    def _run(self, image: np.ndarray, spacing: list[float]) -> np.ndarray:
        """nnU-Net's probabilities ``(C, z, y, x)`` of a ``(1, z, y, x)`` image."""
        _, probs = self.predictor.predict_single_npy_array(
            image, {"spacing": spacing}, None, None, True
        )
        if hasattr(probs, "detach"):
            probs = probs.detach().cpu().numpy()
        probs = np.asarray(probs, dtype=np.float32)
        if probs.ndim != 4 or probs.shape[1:] != image.shape[1:]:
            raise RuntimeError(
                f"nnU-Net returned probabilities of shape {probs.shape} for an image of "
                f"shape {image.shape[1:]}"
            )
        return probs

    def providers(self) -> list[str]:
        """The device nnU-Net runs on (``"cpu"``, ``"cuda:0"``)."""
        device = self.predictor.device
        return [f"{device.type}:{device.index}" if device.index is not None else device.type]


def _model_grid_spacing(predictor: Any) -> list[float]:
    """Spacing (nnU-Net's original axis order) at which an image needs no resampling."""
    plans = predictor.plans_manager
    target = [float(s) for s in predictor.configuration_manager.spacing]
    if len(target) == 2:  # 2d: the slice axis keeps the dataset's median spacing
        target = [float(plans.plans["original_median_spacing_after_transp"][0]), *target]
    spacing = [1.0, 1.0, 1.0]
    for axis, original in enumerate(plans.transpose_forward):
        spacing[original] = target[axis]
    return spacing


def _check_card_fields(card: ModelCard) -> None:
    """nnU-Net prepares its own input and returns probabilities: the card must say so."""
    spec = card.input
    problems = []
    if spec.normalise != "none":
        problems.append(("input.normalise", "must be none: nnU-Net normalises its input itself"))
    for name in ("spacing_mm", "size"):
        if getattr(spec, name) is not None:
            problems.append(
                (f"input.{name}", "must be omitted: nnU-Net resamples to its plans itself")
            )
    if card.output.activation != "none":
        problems.append(("output.activation", "must be none: nnU-Net returns probabilities"))
    if problems:
        raise ModelCardError.many(card.card_path, problems)


def _read_json(card: ModelCard, folder: Path, name: str) -> dict[str, Any]:
    """``folder/name`` parsed; a card error naming ``path`` when missing or not JSON."""
    path = folder / name
    if not path.is_file():
        raise card.error("path", f"{folder} has no {name} (not a trained nnU-Net model folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise card.error("path", f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise card.error("path", f"{path}: expected a JSON object")
    return data


def _check_dataset(
    card: ModelCard, folder: Path, dataset: dict[str, Any], plans: dict[str, Any]
) -> None:
    """One input channel, plain labels (no regions) matching the card's ``output.labels``, and
    a reader that keeps the files' voxel order."""
    channels = dataset.get("channel_names", dataset.get("modality", {}))
    if len(channels) != 1:
        raise card.error("path", f"the model takes {len(channels)} input channels; qcloop has 1")
    reader = str(plans.get("image_reader_writer", ""))
    if "Reorient" in reader:
        raise card.error(
            "path", f"the model was trained with {reader}, which reorients images; unsupported"
        )
    labels = {k: v for k, v in dict(dataset.get("labels", {})).items() if k != "ignore"}
    if any(isinstance(v, list | tuple) for v in labels.values()):
        raise card.error("path", "region-based nnU-Net models (label tuples) are not supported")
    try:
        by_value = {int(v): str(k) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise card.error("path", f"{folder / 'dataset.json'}: labels are not integers") from None
    if sorted(by_value) != list(range(len(by_value))):
        raise card.error("path", f"dataset.json labels are not 0..N-1: {sorted(by_value)}")
    card_labels = card.output.labels
    if len(by_value) != len(card_labels):
        raise card.error(
            "output.labels",
            f"the model has {len(by_value)} classes {by_value}; output.labels lists "
            f"{len(card_labels)}",
        )
    for value, name in by_value.items():
        model_label = LABEL_NAMES.get(name.strip().lower())
        if (
            model_label is not None
            and model_label != LABEL_NAMES[card_labels[value].strip().lower()]
        ):
            raise card.error(
                "output.labels",
                f"class {value} is {name!r} in the model's dataset.json, the card says "
                f"{card_labels[value]!r}",
            )


def _folds(card: ModelCard, folder: Path, params: NnunetParams) -> tuple[int | str, ...]:
    """The folds to load, each holding the checkpoint."""
    name = params.checkpoint
    if params.folds is None:
        found = {
            p.name.removeprefix("fold_") for p in folder.glob("fold_*") if (p / name).is_file()
        }
        numbered = sorted(int(f) for f in found if f.isdigit())
        if numbered:
            return tuple(numbered)
        if "all" in found:
            return ("all",)
        existing = sorted(p.name for p in folder.glob("fold_*"))
        if existing and "checkpoint" in card.module_params:
            raise card.error("params.checkpoint", f"no fold holds {name} ({', '.join(existing)})")
        raise card.error("path", f"{folder} has no fold_N/{name}")
    for fold in params.folds:
        fold_dir = folder / f"fold_{fold}"
        if not fold_dir.is_dir():
            available = sorted(p.name for p in folder.glob("fold_*")) or ["none"]
            raise card.error(
                "params.folds", f"{fold_dir} does not exist (found: {', '.join(available)})"
            )
        if not (fold_dir / name).is_file():
            raise card.error("params.checkpoint", f"{fold_dir} has no {name}")
    return params.folds


def _load_checkpoint(card: ModelCard, path: Path) -> dict[str, Any]:
    """A checkpoint, loaded as data only (``weights_only=True``, numpy scalars allowed)."""
    import torch

    allowed: list[Any] = [np.dtype, *(t for t in vars(np.dtypes).values() if isinstance(t, type))]
    core = getattr(np, "_core", None) or np.core
    allowed.append(core.multiarray.scalar)
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = RuntimeError(str(exc).split("WeightsUnpickler error:", 1)[-1])  # past advice
        problem = f"{path}: not loadable as weights only ({_short(reason)})"
        raise card.error("params.checkpoint", problem) from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise card.error("params.checkpoint", f"{path}: not an nnU-Net checkpoint")
    return checkpoint


def _find_trainer(name: str) -> type | None:
    """The trainer class ``name`` from nnU-Net's trainer package; modules that fail to import
    (an unrelated trainer's optional dependency: timm, torchvision) are passed over."""
    import nnunetv2.training.nnUNetTrainer as package

    prefix = f"{package.__name__}."
    for info in pkgutil.walk_packages(package.__path__, prefix, onerror=lambda _name: None):
        if info.ispkg:
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:
            continue
        found = getattr(module, name, None)
        if isinstance(found, type):
            return found
    return None


def _network(card: ModelCard, trainer_name: str, plans_manager: Any, config: Any, ds: dict) -> Any:
    """The trainer's network for the configuration (deep supervision off), untrained."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    trainer = _find_trainer(trainer_name)
    if trainer is None and os.environ.get("nnUNet_extTrainer"):  # noqa: SIM112 (nnU-Net's)
        try:
            trainer = recursive_find_trainer_class_by_name(trainer_name)
        except Exception as exc:
            raise card.error(
                "path", f"the checkpoint's trainer {trainer_name!r}: {_short(exc)}"
            ) from exc
    if trainer is None:
        raise card.error(
            "path",
            f"the checkpoint's trainer {trainer_name!r} is not one of nnU-Net's; a trainer "
            "of your own needs its folder in the nnUNet_extTrainer variable",
        )
    inputs = determine_num_input_channels(plans_manager, config, ds)
    outputs = plans_manager.get_label_manager(ds).num_segmentation_heads
    if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
        return trainer.build_network_architecture(
            plans_manager, config, inputs, outputs, enable_deep_supervision=False
        )
    return trainer.build_network_architecture(  # older nnU-Net versions
        config.network_arch_class_name,
        config.network_arch_init_kwargs,
        config.network_arch_init_kwargs_req_import,
        inputs,
        outputs,
        enable_deep_supervision=False,
    )


def _predictor(params: NnunetParams) -> Any:
    """An ``nnUNetPredictor`` with the card's options, on CUDA when available, else the CPU."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.redirect_stdout(io.StringIO()):  # its notice about a device other than CUDA
        return nnUNetPredictor(
            tile_step_size=params.tile_step_size,
            use_gaussian=params.use_gaussian,
            use_mirroring=params.use_mirroring,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            allow_tqdm=False,
        )


def load_nnunet(card: ModelCard) -> NnunetCardModel:
    """The ``nnunet`` kind: nnU-Net's predictor over the trained model folder at ``path``.

    Raises:
        ModelCardError: the folder, a fold, the checkpoint, a parameter or the card's
            input/output fields do not fit (the field is named).
        MissingExtraError: ``nnunetv2`` is not installed (the ``nnunet`` extra).
    """
    _check_card_fields(card)
    params = nnunet_params(card)
    folder = card.resolved_path
    if not folder.is_dir():
        raise card.error("path", f"{folder} is not a folder (kind nnunet needs a trained model)")
    dataset, plans = (
        _read_json(card, folder, "dataset.json"),
        _read_json(card, folder, "plans.json"),
    )
    _check_dataset(card, folder, dataset, plans)
    folds = _folds(card, folder, params)
    require("nnunetv2", "nnunet", _FEATURE)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    checkpoints = [_load_checkpoint(card, folder / f"fold_{f}" / params.checkpoint) for f in folds]
    first = checkpoints[0]
    configuration = str(first.get("init_args", {}).get("configuration", ""))
    plans_manager = PlansManager(plans)
    if configuration not in plans.get("configurations", {}):
        raise card.error(
            "path", f"the checkpoint's configuration {configuration!r} is not in plans.json"
        )
    config = plans_manager.get_configuration(configuration)
    trainer_name = str(first.get("trainer_name", "nnUNetTrainer"))
    network = _network(card, trainer_name, plans_manager, config, dataset)
    weights = [c["network_weights"] for c in checkpoints]
    # every fold's weights must fit; the first fold's stay loaded
    for fold, state in reversed(list(zip(folds, weights, strict=True))):
        try:
            network.load_state_dict(state)
        except Exception as exc:
            problem = f"fold_{fold}: the weights do not fit ({_short(exc)})"
            raise card.error("params.checkpoint", problem) from exc
    predictor = _predictor(params)
    mirror_axes = first.get("inference_allowed_mirroring_axes")
    predictor.manual_initialization(
        network, plans_manager, config, weights, dataset, trainer_name, mirror_axes
    )
    return NnunetCardModel(predictor, folder, folds, configuration)


@hookimpl
def register_model_kinds(register: Register) -> None:
    """Register the ``nnunet`` model kind."""
    register("nnunet", load_nnunet)
