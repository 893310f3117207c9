"""Progress of epoch loops: a bar on a terminal, log lines otherwise."""

from __future__ import annotations

import io
import logging

import pytest

from qcloop.monitor.core import progress
from qcloop.monitor.core.progress import EpochBar


def test_without_a_terminal_each_epoch_is_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("qcloop.test.progress")
    with caplog.at_level(logging.INFO, logger=log.name), EpochBar("training SA", 3, 1, log) as bar:
        bar.update({"loss": 0.123456, "val Dice": 0.8, "still OoD": 2})
        bar.update({})
    assert [r.getMessage() for r in caplog.records] == [
        "training SA: epoch 2/3: loss 0.1235, val Dice 0.8, still OoD 2",
        "training SA: epoch 3/3",
    ]
    silent = EpochBar("refining", 2)  # a loop that logs its own lines
    with caplog.at_level(logging.INFO):
        silent.update({"loss": 1.0})
    assert len(caplog.records) == 2


def test_on_a_terminal_a_bar_shows_the_epoch_and_the_figures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    monkeypatch.setattr(progress.sys, "stderr", err)
    with EpochBar("training LA", 4) as bar:
        bar.update({"loss": 0.5, "val Dice": 0.75})
        bar.update({"loss": 0.25})
    text = err.getvalue()
    assert "training LA" in text and "2/4" in text and "loss=0.25" in text
