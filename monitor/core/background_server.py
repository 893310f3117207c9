"""A stdlib HTTP server running in a daemon thread: its bound address, its URL, and a clean stop.
Shared by the monitor's Alertmanager webhook and the Prometheus exporter's ``/metrics``."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["BackgroundServer"]


class BackgroundServer:
    """A ``socketserver``-style server (``server_address``, ``serve_forever``, ``shutdown``,
    ``server_close``) served from ``thread``, or from a new daemon thread named ``name``.

    Args:
        server: the bound server.
        path: the path its URL names (``/metrics``, ``/alertmanager``).
        thread: the thread already serving it; ``None``: :meth:`start` starts one.
        name: the name of the thread :meth:`start` starts.
    """

    def __init__(
        self,
        server: Any,
        path: str = "/",
        thread: threading.Thread | None = None,
        name: str = "qcloop-http",
    ) -> None:
        self._server = server
        self.path = path
        self._thread = thread or threading.Thread(
            target=server.serve_forever, name=name, daemon=True
        )

    @property
    def host(self) -> str:
        """Bound address."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """Bound port."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://host:port/path``."""
        return f"http://{self.host}:{self.port}{self.path}"

    def start(self) -> BackgroundServer:
        """Serve in the background (a no-op when already serving); returns ``self``."""
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
