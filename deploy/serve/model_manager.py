"""How ``qcloop serve`` swaps its models without dropping a request.

A :class:`ModelManager` holds the bundle in use. Its poll loop (for sources that can change)
builds a new bundle in a worker thread, off the request path, then replaces the reference in one
assignment; a request takes the reference once when it starts, so requests in flight finish on
the models they started with, and no request waits for or fails during a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

from qcloop.deploy.serve.model_source import ModelBundle, ModelSource, check_runtime

log = logging.getLogger(__name__)

__all__ = ["ModelManager"]


class ModelManager:
    """Holds the models in use and replaces them when the source changes.

    Args:
        source: where the models come from.
        runtime: a registered runtime name.
        poll_s: seconds between fingerprint checks (dynamic sources only).
        on_swap: called with (old, new) bundles after a reload (e.g. to reset drift windows).
        on_failure: called with the error message when a load or reload fails.
    """

    def __init__(
        self,
        source: ModelSource,
        runtime: str,
        poll_s: float = 30.0,
        on_swap: Callable[[ModelBundle | None, ModelBundle], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        check_runtime(runtime)
        self.source = source
        self.runtime = runtime
        self.poll_s = float(poll_s)
        self.on_swap = on_swap
        self.on_failure = on_failure
        self._bundle: ModelBundle | None = None
        self._lock = threading.Lock()
        self.reloads = 0
        self.reload_failures = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def bundle(self) -> ModelBundle | None:
        """The models in use now (``None`` until the first load succeeds)."""
        return self._bundle

    def install(self, bundle: ModelBundle) -> None:
        """Make ``bundle`` the models in use (one reference assignment)."""
        with self._lock:
            old, self._bundle = self._bundle, bundle
        if old is not None:
            self.reloads += 1
        log.info(
            "serving %s (%s): %s",
            self.source.describe(),
            bundle.runtime,
            {v: d["model"].get("version") for v, d in bundle.describe()["views"].items()},
        )
        for view, info in bundle.describe()["views"].items():
            log.info("%s runtime %s providers %s", view, info["runtime"], info["providers"])
        if self.on_swap is not None:
            try:
                self.on_swap(old, bundle)
            except Exception:  # a listener must not undo a reload
                log.exception("model swap listener failed")

    def load_now(self) -> ModelBundle:
        """Load the source's models in this thread and install them."""
        bundle = self.source.load(self.runtime)
        self.install(bundle)
        return bundle

    async def refresh(self) -> bool:
        """Check the source once; load and install new models if it changed. True if swapped.

        Loading runs in a worker thread; a failure is logged and the models in use stay.
        """
        try:
            current = self._bundle
            if current is not None and self.source.dynamic:
                fingerprint = await asyncio.to_thread(self.source.fingerprint)
                if fingerprint == current.fingerprint:
                    return False
            elif current is not None:
                return False
            bundle = await asyncio.to_thread(self.source.load, self.runtime)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.reload_failures += 1
            self.last_error = str(exc)
            log.error("model reload from %s failed: %s", self.source.describe(), exc)
            if self.on_failure is not None:
                self.on_failure(str(exc))
            return False
        self.last_error = None
        self.install(bundle)
        return True

    async def run(self) -> None:
        """Load the models if none are installed, then poll a dynamic source forever."""
        while True:
            await self.refresh()
            if self._bundle is not None and not self.source.dynamic:
                return
            await asyncio.sleep(self.poll_s)

    def start(self) -> None:
        """Start :meth:`run` as a task of the running event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        """Cancel the poll task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
