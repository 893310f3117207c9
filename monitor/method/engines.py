"""The ``local`` engine of ``assess`` and ``predict``: every case scored in this process, one
at a time, streamed (nothing per case is held after its record is written). Registered like any
other engine; ``ray`` (the deploy plugin) spreads the same work over a cluster.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from qcloop.monitor import hookimpl
from qcloop.monitor.core.hookspecs import Register
from qcloop.monitor.core.progress import progress

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.data import CaseSource
    from qcloop.monitor.method.case_worker import Outcome, ViewJob

# Loaded with the built-in plugins by every command (even --help): nothing heavy (torch) at
# import time; the scorer is imported when an engine runs.


class LocalEngine:
    """Scores the cases of a view in this process with one :class:`ViewScorer`."""

    name = "local"

    def __init__(self, **params: Any) -> None:
        unused = sorted(k for k, v in params.items() if v is not None)
        if unused:
            raise ValueError(
                f"the local engine takes no {', '.join(unused)} (that is --engine ray)"
            )

    def outcomes(self, job: ViewJob, sources: Sequence[CaseSource]) -> Iterator[Outcome]:
        """One outcome per source, in order."""
        from qcloop.monitor.method.case_worker import ViewScorer

        if not sources:
            return
        scorer = ViewScorer(job)
        for source in progress(sources, desc=f"assessing {job.view}"):
            yield scorer.score(source)

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@hookimpl
def register_engines(register: Register) -> None:
    """Register the built-in ``local`` engine."""
    register("local", LocalEngine)
