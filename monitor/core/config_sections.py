"""The sections of a qcloop configuration: pydantic models, one per YAML section.

Every model forbids unknown keys, so a typo is an error rather than a silently ignored setting.
Components are named (``{name: iqr, params: {k: 1.5}}``) and resolved through the plugin
registries; the built-in default configuration is ``QcloopConfig()``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AssessmentConfig",
    "AugmentationConfig",
    "ComponentConfig",
    "MonitoringConfig",
    "PluginsConfig",
    "PreprocessingConfig",
    "QCConfig",
    "QcloopConfig",
    "RefinementConfig",
    "RegistryConfig",
    "ServingConfig",
    "TrackingConfig",
    "TrainingConfig",
]


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
    flag_on: Literal["fences", "est"] = Field(
        default="fences",
        description="What flags a case OoD: 'fences' (the threshold strategy's fences on "
        "pDC/pHD, the paper) or 'est' (the calibrated est_dice of the decision structure "
        "below est_flag_dice; needs RUN/<VIEW>/estimator.json from qcloop fit-estimator; the "
        "fences' verdict stays in the record as ood_fences). QC-based selection and the "
        "refiners' stopping test use the fences either way.",
    )
    est_flag_dice: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="flag_on est: a case whose decision est_dice is below this is flagged.",
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
    drift_rule: Literal["binomial", "fixed"] = Field(
        default="binomial",
        description="How the window's OoD flags are judged: 'binomial' tests them against the "
        "model's own in-distribution flag rate (measured leave-one-out on its reference cases, "
        "recorded in fences.json) at alert_alpha; 'fixed' compares the window's fraction with "
        "ood_fraction_limit (also the fallback for runs that recorded no rate).",
    )
    alert_alpha: float = Field(
        default=0.01,
        gt=0.0,
        lt=0.5,
        description="binomial rule: alert when a window this flagged (or more) would have at "
        "most this probability under the reference flag rate (one-sided, per check).",
    )
    ood_fraction_limit: float = Field(
        default=0.3,
        gt=0.0,
        le=1.0,
        description="fixed rule: alert when the window's fraction of OoD cases exceeds this.",
    )
    median_pdc_shift_limit: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Alert when the window's median decision pDC falls this far below the "
        "reference median (the validation cases at calibration).",
    )
    drift_score: Literal["pdc", "est"] = Field(
        default="pdc",
        description="The quality score whose window median the drift policy watches: 'pdc' "
        "(the paper's pseudo-Dice, against the reference median and median_pdc_shift_limit) "
        "or 'est' (the calibrated est_dice of the decision structure, against the absolute "
        "floor min_median_est_dice; needs RUN/<VIEW>/estimator.json from qcloop "
        "fit-estimator). The OoD-flag rule is the same for both.",
    )
    min_median_est_dice: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="drift_score est: alert when the window's median est_dice falls below this.",
    )
    refine_on_alert: bool = Field(
        default=True, description="Run the refiner on the flagged window when an alert fires."
    )
    http_host: str = Field(
        default="127.0.0.1",
        description="Interface of the monitor's HTTP endpoint (/metrics, /healthz and, with "
        "qcloop monitor --webhook, /alertmanager): loopback by default; 0.0.0.0 in a container "
        "that Prometheus or Alertmanager reach from outside.",
    )
    http_port: int = Field(
        default=9308, ge=0, le=65535, description="Port of that endpoint (0: none)."
    )
    webhook_secret_env: str = Field(
        default="QCLOOP_WEBHOOK_SECRET",
        description="Environment variable holding the Alertmanager webhook's shared secret.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Read the keys of the separate /metrics and webhook servers (run folders written
        before the two became one endpoint) as ``http_host``/``http_port``."""
        if isinstance(data, dict) and {"metrics_host", "metrics_port", "webhook_host"} & set(data):
            data = dict(data)
            webhook_host = data.pop("webhook_host", None)
            for old, new in (("metrics_host", "http_host"), ("metrics_port", "http_port")):
                if old in data:
                    value = data.pop(old)
                    data.setdefault(new, value)
            if webhook_host not in (None, data.get("http_host", "127.0.0.1")):
                # the webhook listened elsewhere (0.0.0.0 in a pod): the endpoint must too
                data["http_host"] = webhook_host
        return data


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
    upload_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a client has to send its whole request body; a slower one gets 408 "
        'and is counted (qcloop_case_errors_total{stage="upload_timeout"}). Bodies are read '
        "before a processing slot is taken, so slow clients never hold one.",
    )
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
