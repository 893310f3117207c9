"""Masks kept for one fetch each (``POST /v1/segment?mask=link``)."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict

__all__ = ["MASK_STORE_BYTES", "MASK_STORE_ENTRIES", "MASK_TTL_S", "MaskStore"]

#: masks kept for ``?mask=link``: at most this many, this many bytes, this many seconds.
MASK_STORE_ENTRIES = 64
MASK_STORE_BYTES = 256 * 1024 * 1024
MASK_TTL_S = 300.0


class MaskStore:
    """Masks kept for one fetch each: random tokens, expiry, bounded count and bytes."""

    def __init__(
        self,
        max_entries: int = MASK_STORE_ENTRIES,
        max_bytes: int = MASK_STORE_BYTES,
        ttl_s: float = MASK_TTL_S,
    ) -> None:
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self.ttl_s = float(ttl_s)
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, payload: bytes) -> str:
        """Keep ``payload``; returns its token. The oldest masks go when the store is full."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._expire(time.monotonic())
            while self._items and (
                len(self._items) >= self.max_entries or self._bytes + len(payload) > self.max_bytes
            ):
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= len(old)
            self._items[token] = (time.monotonic() + self.ttl_s, payload)
            self._bytes += len(payload)
        return token

    def take(self, token: str) -> bytes | None:
        """The mask of ``token``, removed from the store; ``None`` if unknown or expired."""
        with self._lock:
            self._expire(time.monotonic())
            item = self._items.pop(token, None)
            if item is None:
                return None
            self._bytes -= len(item[1])
            return item[1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _expire(self, now: float) -> None:
        for token in [t for t, (expires, _) in self._items.items() if expires <= now]:
            self._bytes -= len(self._items.pop(token)[1])
