"""The ``ray`` engine of ``assess`` and ``predict``: the per-case work spread over a Ray cluster
with Ray Data (the ``ray`` extra).

Cases stream through ``map_batches`` into a pool of actors; each actor loads the view's model
set once (a :class:`~qcloop.monitor.method.case_worker.ViewScorer`, on a GPU when it was given
one) and scores its batches exactly as the local engine does, so the records are the same.
Masks and figures are written by the actors (write then rename) into the output folder, which
must be shared by every node; records come back to the driver, which writes them in case order.

Faults: an actor that dies is restarted and its batch retried (Ray Data's defaults for actor
pools, ``max_restarts=-1``, ``max_task_retries=-1``): no case is lost, a case is never recorded
twice (the driver keeps one outcome per case), and the temporary file of a write cut short is
removed when the job ends. A case that fails is a ``skipped`` outcome with its reason, as
locally.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qcloop.monitor.core.optional import require
from qcloop.monitor.core.progress import progress
from qcloop.monitor.data import CaseSource
from qcloop.monitor.method.case_worker import Outcome, ViewJob, ViewScorer, check_job

log = logging.getLogger(__name__)

#: Cases per actor call when ``--batch-size`` is not given: small enough that a retried batch
#: costs little, large enough that scheduling is a small part of it.
DEFAULT_BATCH = 8


class RayEngine:
    """Scores cases on a Ray cluster: the one at ``address``, else a local one started and
    stopped with the engine.

    Args:
        address: a running cluster (``ray://host:10001``, ``host:6379`` or ``auto``).
        workers: actors per view (default: the cluster's CPUs, or GPUs / ``num_gpus_per_worker``).
        num_gpus_per_worker: GPUs each actor reserves (its models run on CUDA when it gets one).
        batch_size: cases per actor call.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        num_gpus_per_worker: float | None = None,
        batch_size: int | None = None,
    ) -> None:
        require("ray.data", "ray", "--engine ray")
        for what, value in (("workers", workers), ("batch_size", batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{what} must be at least 1, got {value}")
        if num_gpus_per_worker is not None and num_gpus_per_worker < 0:
            raise ValueError(f"num_gpus_per_worker must be >= 0, got {num_gpus_per_worker}")
        self.address = address
        self.workers = workers
        self.gpus = float(num_gpus_per_worker or 0.0)
        self.batch_size = batch_size or DEFAULT_BATCH
        self._started = False

    def __enter__(self) -> RayEngine:
        import ray

        if not ray.is_initialized():
            ray.init(
                address=self.address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
            self._started = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver shows one bar per view
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per dataset
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        if self._started:
            ray.shutdown()
            self._started = False

    def _concurrency(self) -> int:
        import ray

        if self.workers is not None:
            return self.workers
        resources = ray.cluster_resources()
        if self.gpus > 0:
            return max(1, int(resources.get("GPU", 0) // self.gpus))
        return max(1, int(resources.get("CPU", 1)))

    def outcomes(self, job: ViewJob, sources: Sequence[CaseSource]) -> Iterator[Outcome]:
        """One outcome per source, in the sources' order."""
        import ray

        if not sources:
            return
        check_job(job)  # a run that cannot be judged fails here, not in every actor
        items = [{"i": i, "source": pickle.dumps(s)} for i, s in enumerate(sources)]
        blocks = max(1, -(-len(items) // self.batch_size))
        mapped = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            _ScoreBatch,
            fn_constructor_kwargs={"job": job, "use_gpu": self.gpus > 0},
            batch_size=self.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self._concurrency()),
            num_cpus=1,
            num_gpus=self.gpus or None,
            # qcloop's settings (plugins blocked or loaded, ...) hold in the actors too
            runtime_env={
                "env_vars": {k: v for k, v in os.environ.items() if k.startswith("QCLOOP_")}
            },
        )
        ordered = _in_order(mapped.iter_batches(batch_size=None, batch_format="numpy"))
        n = 0
        for outcome in progress(ordered, f"assessing {job.view} (ray)", len(items)):
            n += 1
            yield outcome
        if n != len(items):
            raise RuntimeError(f"the Ray job returned {n} of {len(items)} cases")


def _in_order(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[Outcome]:
    """The outcomes of numbered cases in number order; an outcome that arrives before an
    earlier case's waits, and a retried batch's second outcome for a case is dropped."""
    waiting: dict[int, Outcome] = {}
    following = 0
    for batch in batches:
        for i, kind, payload in zip(batch["i"], batch["kind"], batch["payload"], strict=True):
            if int(i) >= following:
                waiting.setdefault(int(i), (str(kind), _loads(payload)))
        while following in waiting:
            yield waiting.pop(following)
            following += 1


def _loads(payload: Any) -> dict[str, Any]:
    import json

    return json.loads(str(payload))


class _ScoreBatch:
    """A Ray Data actor: one view's model set, scoring batches of pickled case sources."""

    def __init__(self, job: ViewJob, use_gpu: bool) -> None:
        import torch

        torch.set_num_threads(1)  # one CPU reserved per actor: no oversubscription on a node
        device = "cuda" if use_gpu and torch.cuda.is_available() else None
        self.scorer = ViewScorer(job, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json

        kinds, payloads = [], []
        for blob in batch["source"]:
            kind, payload = self.scorer.score(pickle.loads(blob))
            kinds.append(kind)
            payloads.append(json.dumps(payload, allow_nan=False))
        return {
            "i": batch["i"],
            "kind": np.array(kinds, dtype=object),
            "payload": np.array(payloads, dtype=object),
        }
