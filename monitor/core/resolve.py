"""Configured components, built by name through the plugin registries.

The core resolves a component once per use (a run, a service, a refinement), then calls it as a
plain object: nothing per case goes through pluggy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import torch

    from qcloop.monitor.core.config import QcloopConfig
    from qcloop.monitor.core.interfaces import ModelRegistry, Refiner, Runtime, ThresholdStrategy


def build_segmenter(name: str, params: dict[str, Any]) -> torch.nn.Module:
    """The segmenter ``name`` built with ``params``."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    return get_plugin_manager().segmenters().create(name, params)


def build_qc_module(name: str, params: dict[str, Any]) -> Any:
    """The QC module ``name`` built with ``params``."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    return get_plugin_manager().qc_modules().create(name, params)


def build_threshold_strategy(cfg: QcloopConfig) -> ThresholdStrategy:
    """The configured threshold strategy (``assessment.thresholds``)."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    c = cfg.assessment.thresholds
    return get_plugin_manager().threshold_strategies().create(c.name, c.params)


def build_refiner(cfg: QcloopConfig, *, seed: int) -> Refiner:
    """The configured refiner (``refinement.refiner``) for one candidate: ``seed`` is the run's
    seed plus the candidate's index, unless the refiner's params set one."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    rc = cfg.refinement.refiner
    return get_plugin_manager().refiners().create(rc.name, {"seed": seed, **rc.params})


def build_runtime(
    name: str, run_dir: Path, view: str, cfg: QcloopConfig | None = None, **params: Any
) -> Runtime:
    """The registered runtime ``name`` for ``view`` of the run folder ``run_dir`` (``cfg``: the
    run's configuration, read from ``run_dir/config.yaml`` when ``None``)."""
    from pathlib import Path

    from qcloop.monitor.core.config import load_config
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    factory = get_plugin_manager().runtimes()[name].factory
    if cfg is None:
        config_file = Path(run_dir) / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: missing - not a qcloop run folder")
        cfg = load_config(config_file)
    return factory(Path(run_dir), view, cfg, **params)


def build_model_registry(
    cfg: QcloopConfig, *, uri: str | None = None, **params: Any
) -> ModelRegistry:
    """The configured model registry (``registry.backend``) at ``uri`` (default
    ``registry.uri``, else the backend's own default); ``params`` override the configured ones
    (``cache_dir``)."""
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    backend = cfg.registry.backend
    merged = {**backend.params, **params}
    return (
        get_plugin_manager()
        .model_registries()
        .create(backend.name, {"uri": uri or cfg.registry.uri, **merged})
    )
