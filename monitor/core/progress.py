"""Progress bars for long work: tqdm on a terminal, silent otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when stderr is a terminal; otherwise yield it unchanged."""
    if not sys.stderr.isatty():
        yield from iterable
        return
    from tqdm import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


class EpochBar:
    """Progress of an epoch loop (training, refinement): on a terminal a tqdm bar with the
    epoch count and the latest figures (loss, validation Dice, ...); otherwise one log line per
    epoch through ``logger``.

    Args:
        desc: what is running (``"training SA"``).
        total: epochs in all.
        initial: epochs already done (a resumed run).
        logger: where the per-epoch lines go when stderr is not a terminal (``None``: none,
            for a loop that logs its own).
    """

    def __init__(
        self, desc: str, total: int, initial: int = 0, logger: logging.Logger | None = None
    ) -> None:
        self.desc, self.total, self.done = desc, total, initial
        self._log = logger
        self._bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, figures: dict[str, float]) -> None:
        """One epoch done, with its ``figures`` (name -> value)."""
        self.done += 1
        shown = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in figures.items()}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
            return
        if self._log is None:
            return
        text = ", ".join(f"{k} {v}" for k, v in shown.items())
        self._log.info(
            "%s: epoch %d/%d%s", self.desc, self.done, self.total, f": {text}" * bool(text)
        )

    def close(self) -> None:
        """Remove the bar (a no-op without one)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> EpochBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
