"""The qcloop configuration: one YAML file validated by pydantic models.

Nothing in a configuration executes code: files are read with ``yaml.safe_load`` and components
are named (``{name: iqr, params: {k: 1.5}}``) and resolved through the plugin registries. Every
model forbids unknown keys, so a typo is an error rather than a silently ignored setting. The
built-in default configuration is ``QcloopConfig()``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.plugin_manager import ComponentRegistry, QcloopPluginManager

__all__ = [
    "AssessmentConfig",
    "AugmentationConfig",
    "ComponentConfig",
    "ConfigError",
    "PluginsConfig",
    "PreprocessingConfig",
    "QCConfig",
    "QcloopConfig",
    "RefinementConfig",
    "TrackingConfig",
    "TrainingConfig",
    "check_components",
    "config_schema",
    "dump_config",
    "load_config",
    "parse_config",
    "save_config",
]


class ConfigError(ValueError):
    """An invalid configuration; ``problems`` holds one ``"path: message"`` line per problem."""

    def __init__(self, problems: list[str], source: str = "<config>") -> None:
        self.problems = list(problems)
        self.source = source
        count = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {count} problem{'s' if count != 1 else ''}\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentConfig(_Section):
    """A component chosen by name from a plugin registry, with keyword parameters."""

    name: str = Field(min_length=1, description="Registered component name.")
    params: dict[str, Any] = Field(
        default={}, description="Keyword arguments passed to the component's factory."
    )


class PreprocessingConfig(_Section):
    """How images are brought to the network's grid."""

    size: int = Field(
        default=128, gt=0, description="Square in-plane size in voxels (a multiple of 16)."
    )
    target_spacing_mm: float | None = Field(
        default=1.8, gt=0, description="In-plane spacing to resample to, in mm; null keeps it."
    )
    normalisation: Literal["zscore", "percentile"] = Field(
        default="zscore", description="Intensity normalisation per image."
    )

    @field_validator("size")
    @classmethod
    def _size_multiple_of_16(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"must be a multiple of 16, got {value}")
        return value


class AugmentationConfig(_Section):
    """Random augmentation of training slices."""

    flip: bool = Field(default=True, description="Random left-right and up-down flips.")
    rotation_deg: float = Field(
        default=15.0, ge=0, le=180, description="Maximum absolute in-plane rotation, degrees."
    )
    scale: tuple[float, float] = Field(
        default=(0.85, 1.15), description="Range of the random zoom factor (low, high)."
    )

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"must satisfy 0 < low <= high, got {list(value)}")
        return value


class TrainingConfig(_Section):
    """Training of the candidate segmenters."""

    epochs: int = Field(default=30, gt=0, description="Training epochs per candidate.")
    batch_size: int = Field(default=8, gt=0, description="Slices per batch.")
    m_best: int = Field(
        default=3, ge=1, description="Number of best checkpoints kept as candidate segmenters."
    )
    val_every: int = Field(default=1, ge=1, description="Validate every this many epochs.")
    augmentation: AugmentationConfig = Field(
        default=AugmentationConfig(), description="Random augmentation of training slices."
    )
    max_slices_per_epoch: int | None = Field(
        default=None, gt=0, description="Cap on slices drawn per epoch; null uses all."
    )
    lr: float | None = Field(
        default=None, gt=0, description="Learning rate; null uses the architecture's default."
    )
    checkpoint_gap: int = Field(
        default=1,
        ge=1,
        description="Kept checkpoints are at least this many epochs apart (1: the m_best best "
        "epochs, as the paper; larger values give more diverse candidates).",
    )
    min_steps: int = Field(
        default=0,
        ge=0,
        description="Train at least this many optimisation steps: epochs are raised for small "
        "slice sets (a long-axis view has one slice per case).",
    )


class QCConfig(_Section):
    """The quality-control module that reconstructs predicted masks."""

    module: ComponentConfig = Field(
        default=ComponentConfig(name="autoencoder"), description="Registered QC module."
    )
    input: Literal["softmax", "onehot"] = Field(
        default="softmax", description="What the QC module reconstructs."
    )
    epochs: int = Field(default=40, gt=0, description="Training epochs of the QC module.")
    batch_size: int = Field(default=16, gt=0, description="Masks per batch.")
    min_steps: int = Field(
        default=600,
        ge=0,
        description="Train at least this many optimisation steps: epochs are raised for small "
        "mask sets (a long-axis view has one slice per case).",
    )


class AssessmentConfig(_Section):
    """How QC pseudo-metrics become out-of-distribution decisions."""

    decision_structure: Literal["RV", "LV", "MYO", "mean"] = Field(
        default="RV", description="Structure whose pseudo-metrics decide OoD, or their mean."
    )
    hd_units: Literal["mm", "voxel"] = Field(
        default="mm", description="Units of the Hausdorff distances."
    )
    thresholds: ComponentConfig = Field(
        default=ComponentConfig(name="iqr", params={"k": 1.5}),
        description="Registered threshold strategy.",
    )
    population: Literal["reference", "transductive"] = Field(
        default="reference",
        description=(
            "Where fences come from: reference (fitted on the validation cases at training or "
            "calibration time, so each case is judged as it arrives) or transductive (fitted on "
            "the batch being assessed, once it is wholly scored, as in the paper)."
        ),
    )
    pose_normalisation: bool = Field(
        default=False,
        description=(
            "Rotate each predicted case to the training masks' pose before the QC module "
            "reconstructs it (docs/method.md)."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_population(cls, data: Any) -> Any:
        """Configurations before qcloop 0.2 chose the population in the threshold strategy's
        parameters (``{name: iqr, params: {population: ...}}``): read it from there when the
        section does not set it (the parameter stays, as the label the fences record)."""
        if isinstance(data, dict) and "population" not in data:
            params = (data.get("thresholds") or {}).get("params") or {}
            if isinstance(params, dict) and params.get("population") in _POPULATIONS:
                data = {**data, "population": params["population"]}
        return data


_POPULATIONS = ("reference", "transductive")
#: ``refinement.k_semi`` of configurations before qcloop 0.2 (the alpha refiner's default).
_LEGACY_K_SEMI_DEFAULT = 5


class RefinementConfig(_Section):
    """Refinement of the candidates on cases flagged as out of distribution."""

    refiner: ComponentConfig = Field(
        default=ComponentConfig(name="alpha"),
        description="Registered refiner; its options (the alpha refiner's k_semi, ...) are "
        "its params.",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_k_semi(cls, data: Any) -> Any:
        """Configurations before qcloop 0.2 had ``refinement.k_semi`` (the paper's K_semi, read
        by the alpha refiner only): a value other than the old default moves into the refiner's
        parameters; the default is dropped (the alpha refiner's own default is the same)."""
        if not isinstance(data, dict) or "k_semi" not in data:
            return data
        data = dict(data)
        k_semi = data.pop("k_semi")
        if k_semi != _LEGACY_K_SEMI_DEFAULT:
            refiner = dict(data.get("refiner") or {"name": "alpha"})
            params = dict(refiner.get("params") or {})
            params.setdefault("k_semi", k_semi)
            data["refiner"] = {**refiner, "params": params}
        return data


class TrackingConfig(_Section):
    """Experiment tracking."""

    tracker: ComponentConfig | None = Field(
        default=None, description="Registered tracker; null records nothing."
    )


class RegistryConfig(_Section):
    """Registered model versions (a model-registry plugin, MLflow by default) and the
    promotion gate."""

    backend: ComponentConfig = Field(
        default=ComponentConfig(name="mlflow"), description="Registered model-registry backend."
    )
    uri: str | None = Field(
        default=None,
        description="Where the registry lives (MLflow: a tracking URI); null: the backend's "
        "default (MLflow: sqlite:///mlflow.db in the working folder). --tracking-uri overrides.",
    )
    name_prefix: str = Field(
        default="qcloop",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Registered models are named PREFIX-SA and PREFIX-LA.",
    )
    promotion: Literal["auto", "approve", "off"] = Field(
        default="approve",
        description="auto: a challenger that passes the gate becomes champion; approve: it waits "
        "for `qcloop models promote`; off: challengers are registered and never promoted.",
    )
    dice_margin: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Largest drop of mean validation Dice a challenger may show and still pass.",
    )


class MonitoringConfig(_Section):
    """Drift policy of `qcloop monitor` on a rolling window of scored cases, per view."""

    window: int = Field(default=50, ge=2, description="Cases in the rolling window, per view.")
    min_cases: int = Field(
        default=10, ge=1, description="Cases the window must hold before drift is judged."
    )
    ood_fraction_limit: float = Field(
        default=0.3,
        gt=0.0,
        le=1.0,
        description="Alert when the window's fraction of OoD cases exceeds this.",
    )
    median_pdc_shift_limit: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Alert when the window's median decision pDC falls this far below the "
        "reference median (the validation cases at calibration).",
    )
    refine_on_alert: bool = Field(
        default=True, description="Run the refiner on the flagged window when an alert fires."
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Interface of the /metrics endpoint (loopback only by default).",
    )
    metrics_port: int = Field(
        default=9308, ge=0, le=65535, description="Port of /metrics (0: none)."
    )
    webhook_secret_env: str = Field(
        default="QCLOOP_WEBHOOK_SECRET",
        description="Environment variable holding the Alertmanager webhook's shared secret.",
    )


class ServingConfig(_Section):
    """Limits and runtime of `qcloop serve`."""

    runtime: str = Field(
        default="onnxruntime",
        min_length=1,
        description="Registered inference runtime: torch, or onnxruntime (CUDA when it loads; "
        "needs the onnx extra).",
    )
    max_upload_mb: float = Field(default=64.0, gt=0, description="Largest accepted upload (MB).")
    max_inplane: int = Field(
        default=1024, ge=16, description="Largest accepted in-plane image size (voxels per axis)."
    )
    max_slices: int = Field(default=64, ge=1, description="Largest accepted number of slices.")
    max_concurrency: int = Field(default=2, ge=1, description="Requests processed at once.")
    queue_size: int = Field(
        default=8, ge=0, description="Requests waiting beyond those; more get 429 with Retry-After."
    )
    api_key_file: str | None = Field(
        default=None,
        description="File holding the API key; else the QCLOOP_API_KEY environment variable.",
    )
    reload_poll_s: float = Field(
        default=30.0, gt=0, description="How often a --model NAME@ALIAS server checks the alias."
    )


class PluginsConfig(_Section):
    """Which plugins this configuration runs without."""

    block: list[str] = Field(
        default=[],
        description="Plugin names never to use, built-ins included (as `qcloop plugins --all` "
        "lists them), e.g. to replace a built-in exporter by a third-party one.",
    )


class QcloopConfig(_Section):
    """A complete qcloop configuration; every section is optional in a file."""

    seed: int = Field(default=0, ge=0, description="Seed of every random generator.")
    views: list[Literal["SA", "LA"]] = Field(
        default=["SA", "LA"], min_length=1, description="Cardiac views processed."
    )
    preprocessing: PreprocessingConfig = Field(default=PreprocessingConfig())
    segmenter: ComponentConfig = Field(
        default=ComponentConfig(name="bn1"), description="Registered segmenter architecture."
    )
    training: TrainingConfig = Field(default=TrainingConfig())
    qc: QCConfig = Field(default=QCConfig())
    assessment: AssessmentConfig = Field(default=AssessmentConfig())
    refinement: RefinementConfig = Field(default=RefinementConfig())
    tracking: TrackingConfig = Field(default=TrackingConfig())
    registry: RegistryConfig = Field(default=RegistryConfig())
    monitoring: MonitoringConfig = Field(default=MonitoringConfig())
    serving: ServingConfig = Field(default=ServingConfig())
    plugins: PluginsConfig = Field(default=PluginsConfig())

    @field_validator("views")
    @classmethod
    def _unique_views(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"views must not repeat, got {value}")
        return value


# --------------------------------------------------------------------------- reading


def _render_loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _node_line(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest node of ``loc`` present in the composed YAML tree."""
    if root is None:
        return None
    node, line = root, root.start_mark.line + 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    child, line = value, key.start_mark.line + 1
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _duplicate_keys(
    node: yaml.Node | None, path: tuple[int | str, ...] = ()
) -> list[tuple[int, str]]:
    """(line, problem) for keys repeated within one mapping (``safe_load`` keeps only the last)."""
    problems: list[tuple[int, str]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key)
            if name in seen:
                line = key.start_mark.line + 1
                problems.append(
                    (line, f"{_render_loc((*path, name))}: duplicate key (line {line})")
                )
            seen.add(name)
            problems += _duplicate_keys(value, (*path, name))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += _duplicate_keys(item, (*path, index))
    return problems


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    text = f"YAML syntax error: {problem}"
    if mark is not None:
        text = f"line {mark.line + 1}, column {mark.column + 1}: {text}"
    if context and context_mark is not None:
        text += f" ({context} at line {context_mark.line + 1})"
    return text


def parse_config(text: str, source: str = "<string>") -> QcloopConfig:
    """Validate the YAML ``text`` of a configuration; an empty document means all defaults.

    Raises:
        ConfigError: listing every problem with its path (and line, where known), in file order.
    """
    root, data = _read_yaml(text, source)
    return _validated(data, root, source)


def _read_yaml(text: str, source: str) -> tuple[yaml.Node | None, dict[str, Any]]:
    """The YAML node tree (for line numbers) and the mapping of ``text``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc)], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"(top level): expected a mapping of sections, got {type(data).__name__}"], source
        )
    return root, data


def _validated(data: dict[str, Any], root: yaml.Node | None, source: str) -> QcloopConfig:
    """``data`` as a configuration; problems located on the lines of ``root`` where it has them."""
    located = _duplicate_keys(root)
    config = None
    try:
        config = QcloopConfig.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            line = _node_line(root, loc) if loc else None
            suffix = f" (line {line})" if line is not None else ""
            located.append((line or 0, f"{_render_loc(loc)}: {error['msg']}{suffix}"))
    if located or config is None:
        located.sort(key=lambda item: item[0])  # stable: file order, then report order
        raise ConfigError([text for _line, text in located], source)
    return config


def load_config(path: str | os.PathLike[str] | None = None) -> QcloopConfig:
    """The configuration in the YAML file ``path``, or the built-in default when None.

    Raises:
        ConfigError: the file cannot be read or is not a valid configuration.
    """
    if path is None:
        return QcloopConfig()
    return parse_config(_read_text(path), str(path))


def _read_text(path: str | os.PathLike[str]) -> str:
    """The text of a configuration file; ``ConfigError`` naming it when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"(file): cannot read: {exc}"], str(path)) from None


def override_config(base: QcloopConfig, path: str | os.PathLike[str]) -> QcloopConfig:
    """``base`` with the settings of the YAML file ``path`` laid over it, key by key.

    Problems (unknown keys, types, ranges) are reported with the file's lines. Mappings merge
    recursively, so ``qc: {module: {params: {dropout: 0.3}}}`` changes one parameter and keeps
    the others; a component whose ``name`` changes takes the file's ``params`` only.

    Raises:
        ConfigError: the file is not a valid configuration, or the merged result is not.
    """
    root, overrides = _read_yaml(_read_text(path), str(path))
    return _validated(_merge(base.model_dump(mode="json"), overrides), root, str(path))


def _merge(base: Any, override: Any) -> Any:
    """``override`` laid over ``base``: mappings recursively, anything else replaced."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    if "name" in override and "params" in base and override["name"] != base.get("name"):
        base = {**base, "params": {}}  # another component: the old one's params do not apply
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base[key], value) if key in base else value
    return out


def dump_config(cfg: QcloopConfig) -> str:
    """The configuration as YAML, every setting spelled out, sections in declaration order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None)


def save_config(cfg: QcloopConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``cfg`` as YAML to ``path`` atomically; return the path."""
    from qcloop.monitor.core.atomic import write_text

    write_text(path, dump_config(cfg))
    return Path(path)


def config_schema() -> dict[str, Any]:
    """The JSON Schema of a configuration file."""
    return QcloopConfig.model_json_schema()


# --------------------------------------------------------------------------- components


def _component_slots(cfg: QcloopConfig) -> list[tuple[str, str, ComponentConfig]]:
    """(path in the file, registry kind, component) for every named component in ``cfg``."""
    slots = [
        ("segmenter", "segmenters", cfg.segmenter),
        ("qc.module", "qc_modules", cfg.qc.module),
        ("assessment.thresholds", "threshold_strategies", cfg.assessment.thresholds),
        ("refinement.refiner", "refiners", cfg.refinement.refiner),
        ("registry.backend", "model_registries", cfg.registry.backend),
        ("serving.runtime", "runtimes", ComponentConfig(name=cfg.serving.runtime)),
    ]
    if cfg.tracking.tracker is not None:
        slots.append(("tracking.tracker", "trackers", cfg.tracking.tracker))
    return slots


def check_components(cfg: QcloopConfig, pm: QcloopPluginManager) -> list[str]:
    """Problems with the component names of ``cfg`` against the registries of ``pm``."""
    problems = []
    registries: dict[str, ComponentRegistry] = {}
    for path, kind, component in _component_slots(cfg):
        if kind not in registries:
            try:
                registries[kind] = pm.registry(kind)
            except ValueError as exc:  # duplicate registrations make the kind unusable
                problems.append(f"{path}.name: {exc}")
                continue
        registry = registries[kind]
        if component.name not in registry:
            problems.append(f"{path}.name: {registry.unknown_message(component.name)}")
    return problems
