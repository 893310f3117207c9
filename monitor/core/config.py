"""The qcloop configuration: one YAML file validated by pydantic models.

This module is the configuration's public API: the sections (:mod:`.config_sections`), reading
and writing the YAML form with located problem reports (:mod:`.config_yaml`), and the check of
the component names a configuration uses against the plugin registries (here). Nothing in a
configuration executes code: files are read with ``yaml.safe_load`` and components are named
(``{name: iqr, params: {k: 1.5}}``) and resolved through the plugin registries. The built-in
default configuration is ``QcloopConfig()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcloop.monitor.core.config_sections import (
    AssessmentConfig,
    AugmentationConfig,
    ComponentConfig,
    MonitoringConfig,
    PluginsConfig,
    PreprocessingConfig,
    QCConfig,
    QcloopConfig,
    RefinementConfig,
    RegistryConfig,
    ServingConfig,
    TrackingConfig,
    TrainingConfig,
)
from qcloop.monitor.core.config_yaml import (
    ConfigError,
    config_schema,
    dump_config,
    load_config,
    override_config,
    parse_config,
    save_config,
)

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.plugin_manager import ComponentRegistry, QcloopPluginManager

__all__ = [
    "AssessmentConfig",
    "AugmentationConfig",
    "ComponentConfig",
    "ConfigError",
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
    "check_components",
    "config_schema",
    "dump_config",
    "load_config",
    "override_config",
    "parse_config",
    "save_config",
]


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
