"""The Alertmanager webhook of ``qcloop monitor``: the payload, the secret, the dispatch.

Alertmanager POSTs its webhook JSON (version 4: ``version``, ``status``, ``alerts``, each alert
with ``status`` and ``labels``) to ``http://HOST:PORT/alertmanager`` with ``Authorization:
Bearer <secret>`` (``http_config.authorization.credentials_file`` in alertmanager.yml). The
route itself lives in the monitor's HTTP app (:mod:`qcloop.monitor.ops.http_app`); this module
is what it relies on: :func:`parse_payload` (``ValueError`` naming the problem: 400),
:class:`AlertDispatcher` (the constant-time secret check: 401; one result per alert: 202).

Each firing alert with a ``view`` label is handed to the callback (which queues refinement);
resolved alerts are logged only.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/alertmanager"
MAX_BODY_BYTES = 1 << 20
#: Seconds a client has to send a webhook body (Alertmanager sends ~kB at once).
BODY_TIMEOUT_S = 10.0

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


class AlertDispatcher:
    """Checks the webhook's secret and hands each parsed alert to the monitor.

    Args:
        on_alert: called with ``(view, alert)`` for each firing alert that has a ``view``
            label; returns a short outcome (``"queued"``, ``"coalesced"``, ...).
        secret: the shared bearer secret (non-empty).
    """

    def __init__(self, on_alert: AlertCallback, secret: str) -> None:
        if not secret:
            raise WebhookError("the Alertmanager webhook needs a non-empty shared secret")
        self._on_alert = on_alert
        self._expected = f"Bearer {secret}".encode()

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
