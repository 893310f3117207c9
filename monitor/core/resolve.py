"""Configured components, built by name through the plugin registries.

The core resolves a component once per use (a run, a service, a refinement), then calls it as a
plain object: nothing per case goes through pluggy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qcloop.monitor.core.config import QcloopConfig
    from qcloop.monitor.core.interfaces import ThresholdStrategy


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
