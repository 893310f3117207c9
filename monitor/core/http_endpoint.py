"""An ASGI app served by uvicorn from a background thread: the HTTP endpoint of a service that
has its own main loop (``qcloop monitor``: ``/healthz``, ``/metrics``, ``/alertmanager``).

The listening socket is bound in the caller's thread, so a port in use is an ``OSError`` at
start (not a log line from a thread), and port 0 picks a free port that :attr:`port` reports.

Slow and silent clients hold no thread (uvicorn is asynchronous) and are bounded:

* a connection that sends nothing is closed after ``idle_timeout_s`` (uvicorn itself only times
  out idle keep-alive connections *after* a first response; :class:`_IdleClosingH11` arms the
  same timer when the connection opens);
* at most ``max_connections`` connections and requests at once (more get 503);
* a request body is read by the route itself, with its own deadline.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

__all__ = ["HttpEndpoint"]

log = logging.getLogger(__name__)


def _idle_closing_protocol(idle_timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a new connection that sends nothing in time."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _IdleClosingH11(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # the keep-alive timer, armed before the first request: data_received cancels it
            self.timeout_keep_alive_task = self.loop.call_later(
                idle_timeout_s, self.timeout_keep_alive_handler
            )

    return _IdleClosingH11


class HttpEndpoint:
    """Serve ``app`` on ``host:port`` from a daemon thread until :meth:`close`.

    Args:
        app: the ASGI application.
        host: interface to bind (``0.0.0.0`` inside a container).
        port: TCP port (0: a free one).
        idle_timeout_s: seconds a connection may stay silent before it is closed.
        max_connections: connections and requests served at once (more get 503).
        name: the serving thread's name.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        idle_timeout_s: float = 10.0,
        max_connections: int = 64,
        name: str = "qcloop-http",
    ) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise
        config = uvicorn.Config(
            app,
            http=_idle_closing_protocol(idle_timeout_s),
            lifespan="off",
            log_config=None,  # keep qcloop's logging configuration
            access_log=False,
            timeout_keep_alive=max(1, round(idle_timeout_s)),
            limit_concurrency=max_connections,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.host, self.port = self._socket.getsockname()[:2]

    def _serve(self) -> None:
        self._server.run(sockets=[self._socket])

    @property
    def url(self) -> str:
        """``http://host:port`` (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> HttpEndpoint:
        """Serve in the background and wait until requests are answered; returns ``self``."""
        self._socket.listen(128)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP endpoint on {self.url} did not start")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        """Stop serving (requests in flight get a few seconds) and release the port."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._socket.close()
