"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qcloop.monitor.plugins import (
    DISABLE_AUTOLOAD_ENV,
    LOAD_PLUGINS_ENV,
    reset_plugin_manager,
)


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No plugin environment switches set and no cached plugin manager, before and after."""
    monkeypatch.delenv(LOAD_PLUGINS_ENV, raising=False)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    reset_plugin_manager()
    yield monkeypatch
    reset_plugin_manager()
