"""Admission control of ``qcloop serve``: a bounded pool of workers with a bounded queue.

``serving.max_concurrency`` requests are scored at once in a thread pool (PyTorch and ONNX
Runtime release the GIL), never on the event loop; at most ``serving.queue_size`` more wait, and
a request beyond those is refused at once (429 with ``Retry-After``). Every change of the queue
is reported as an :class:`~qcloop.monitor.core.events.AdmissionChanged` event.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qcloop.monitor.core.events import AdmissionChanged

__all__ = ["WorkLimiter"]


class WorkLimiter:
    """Bounded concurrency with a bounded queue, for work run in a thread pool.

    ``workers`` jobs run at once; up to ``queue_size`` more are admitted and wait; beyond that
    :meth:`try_admit` refuses at once. Counters are touched from the event loop only, and each
    change is passed to ``on_change`` (requests running, waiting, and whether one was refused).
    """

    def __init__(
        self,
        workers: int,
        queue_size: int,
        on_change: Callable[[AdmissionChanged], Any] | None = None,
    ) -> None:
        self.workers = int(workers)
        self.capacity = int(workers) + int(queue_size)
        self.admitted = 0
        self.running = 0
        self._semaphore = asyncio.Semaphore(self.workers)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._on_change = on_change
        self._service_s = 1.0  # running mean of a job's duration, for Retry-After

    @property
    def waiting(self) -> int:
        """Admitted requests not running yet (receiving their upload or waiting for a worker)."""
        return max(0, self.admitted - self.running)

    def try_admit(self) -> bool:
        """Admit one request if a worker or a queue place is free."""
        if self.admitted >= self.capacity:
            self._publish(rejected=True)
            return False
        self.admitted += 1
        self._publish()
        return True

    def release(self) -> None:
        """The admitted request is done."""
        self.admitted -= 1
        self._publish()

    def retry_after_s(self) -> int:
        """Seconds after which a refused client may expect a free place."""
        return int(min(60, max(1, math.ceil(self._service_s * self.capacity / self.workers))))

    async def run(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` in the pool once a worker is free (the caller was admitted)."""
        async with self._semaphore:
            self.running += 1
            self._publish()
            start = time.perf_counter()
            try:
                return await asyncio.get_running_loop().run_in_executor(self._pool(), job)
            finally:
                self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - start)
                self.running -= 1
                self._publish()

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="qcloop-score")
            return self._executor

    def shutdown(self) -> None:
        """Stop the pool once its jobs are done (a later job starts a new one)."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def _publish(self, rejected: bool = False) -> None:
        if self._on_change is not None:
            self._on_change(AdmissionChanged(self.running, self.waiting, rejected=rejected))
