"""The Alertmanager webhook receiver of ``qcloop monitor``.

Alertmanager POSTs its webhook JSON (version 4: ``version``, ``status``, ``alerts``, each alert
with ``status`` and ``labels``) to ``http://HOST:PORT/alertmanager`` with ``Authorization:
Bearer <secret>`` (``http_config.authorization.credentials_file`` in alertmanager.yml). The
receiver compares the secret in constant time and answers:

* 401 without the header or with a wrong secret, 404 on another path, 405 for other methods,
* 411 without ``Content-Length``, 413 for a body over 1 MiB, 400 for a body that is not such
  a JSON document,
* 202 with ``{"results": [...]}`` (one entry per alert) otherwise.

Each firing alert with a ``view`` label is handed to the callback (which queues refinement);
resolved alerts are logged only.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from qcloop.monitor.core.background_server import BackgroundServer

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/alertmanager"
#: ``GET`` here answers 200 without the secret: a liveness probe.
HEALTH_PATH = "/healthz"
MAX_BODY_BYTES = 1 << 20
#: Seconds a connection may stay silent (per read or write) before it is dropped.
SOCKET_TIMEOUT_S = 10.0

#: ``on_alert(view, alert) -> outcome``: the monitor's handler of a firing alert.
AlertCallback = Callable[[str, dict[str, Any]], str]


class WebhookError(ValueError):
    """A webhook that cannot start (no shared secret)."""


def webhook_secret(env_name: str) -> str:
    """The shared secret from the environment variable ``env_name``; ``WebhookError`` if unset."""
    secret = os.environ.get(env_name, "").strip()
    if not secret:
        raise WebhookError(
            f"the Alertmanager webhook needs a shared secret: set the environment variable "
            f"{env_name} (monitoring.webhook_secret_env) to the value of Alertmanager's "
            "credentials_file"
        )
    return secret


def parse_payload(body: bytes) -> list[dict[str, Any]]:
    """The alerts of an Alertmanager webhook body; ``ValueError`` naming the problem."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"body is not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise ValueError("body must be a JSON object (Alertmanager webhook format)")
    version = payload.get("version")
    if version is not None and str(version) != "4":
        raise ValueError(f"unsupported webhook version {version!r}: expected '4'")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise ValueError("field 'alerts' must be a list")
    group_status = payload.get("status")
    out = []
    for i, alert in enumerate(alerts):
        if not isinstance(alert, dict):
            raise ValueError(f"alerts[{i}] must be an object")
        labels = alert.get("labels", {})
        if not isinstance(labels, dict):
            raise ValueError(f"alerts[{i}].labels must be an object")
        status = alert.get("status", group_status)
        if status not in ("firing", "resolved"):
            raise ValueError(f"alerts[{i}].status must be 'firing' or 'resolved', got {status!r}")
        out.append(
            {
                "status": status,
                "labels": {str(k): str(v) for k, v in labels.items()},
                "annotations": alert.get("annotations") or {},
                "startsAt": alert.get("startsAt"),
                "fingerprint": alert.get("fingerprint"),
            }
        )
    return out


class AlertmanagerWebhook(BackgroundServer):
    """An HTTP receiver of Alertmanager webhooks, served from a background thread.

    Args:
        on_alert: called with ``(view, alert)`` for each firing alert that has a ``view``
            label; returns a short outcome (``"queued"``, ``"coalesced"``, ...).
        secret: the shared bearer secret (non-empty).
        host: interface to bind (loopback by default).
        port: TCP port (0: a free one).
    """

    def __init__(
        self, on_alert: AlertCallback, secret: str, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if not secret:
            raise WebhookError("the Alertmanager webhook needs a non-empty shared secret")
        self._on_alert = on_alert
        self._expected = f"Bearer {secret}".encode()
        server = ThreadingHTTPServer((host, port), self._handler_class())
        server.daemon_threads = True
        super().__init__(server, WEBHOOK_PATH, name="qcloop-webhook")

    def authorised(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the shared secret (constant time)."""
        return hmac.compare_digest((header or "").strip().encode(), self._expected)

    def handle(self, alerts: list[dict[str, Any]]) -> list[dict[str, str]]:
        """Dispatch parsed alerts; one result per alert."""
        results = []
        for alert in alerts:
            labels = alert["labels"]
            name = labels.get("alertname", "?")
            view = labels.get("view")
            if alert["status"] == "resolved":
                log.info("alertmanager: %s resolved (view %s)", name, view or "-")
                results.append({"alertname": name, "view": view or "", "outcome": "resolved"})
                continue
            if not view:
                log.info("alertmanager: %s firing without a view label: ignored", name)
                results.append({"alertname": name, "view": "", "outcome": "ignored: no view"})
                continue
            try:
                outcome = self._on_alert(view, alert)
            except Exception as exc:  # never let a handler bug kill the receiver
                log.exception("alertmanager: handling %s for %s failed", name, view)
                outcome = f"error: {exc}"
            log.info("alertmanager: %s firing for %s: %s", name, view, outcome)
            results.append({"alertname": name, "view": view, "outcome": outcome})
        return results

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "qcloop-webhook"
            # a client silent this long is dropped (a socket timeout per read and write), so a
            # stalled connection never holds its thread for ever
            timeout = SOCKET_TIMEOUT_S

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("webhook %s: " + format, self.address_string(), *args)

            def _reply(self, code: int, obj: dict[str, Any]) -> None:
                body = json.dumps(obj, allow_nan=False).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if code == 401:
                    self.send_header("WWW-Authenticate", 'Bearer realm="qcloop"')
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                if self.path.split("?", 1)[0] != WEBHOOK_PATH:
                    self._reply(404, {"error": f"not found; post to {WEBHOOK_PATH}"})
                    return
                if not receiver.authorised(self.headers.get("Authorization")):
                    self._reply(401, {"error": "missing or wrong bearer secret"})
                    return
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    self._reply(411, {"error": "Content-Length required"})
                    return
                if int(length) > MAX_BODY_BYTES:
                    self._reply(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
                    return
                body = self.rfile.read(int(length))
                try:
                    alerts = parse_payload(body)
                except ValueError as exc:
                    self._reply(400, {"error": str(exc)})
                    return
                self._reply(202, {"results": receiver.handle(alerts)})

            def _not_allowed(self) -> None:
                self._reply(405, {"error": "only POST is accepted"})

            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] == HEALTH_PATH:  # liveness, no secret needed
                    self._reply(200, {"status": "ok"})
                    return
                self._not_allowed()

            do_PUT = do_DELETE = do_PATCH = _not_allowed

        return Handler
