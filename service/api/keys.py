"""API keys (inline and from a file that is re-read when it changes) and per-key token-bucket rate limits.

Keys are never logged: logs and metrics name a key by ``key_id``, a short hash."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from pathlib import Path

from crfiqa.service.errors import CrfiqaError

log = logging.getLogger("crfiqa.api")
MAX_BUCKETS = 10_000
STAT_EVERY_S = 1.0  # how often a request may stat the keys file (a mounted Secret changes by symlink swap)


def key_id(key: str) -> str:
    """A short, stable, non-reversible name for a key (for metrics and logs)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def read_keys_file(path: Path) -> list[str]:
    """Keys of a file: one per line; blank lines and ``#`` comments are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


class KeyStore:
    """The valid keys: ``CRFIQA_API_KEYS`` plus the keys file; ``enabled`` when either is configured."""

    def __init__(self, inline: list[str], path: Path | None = None) -> None:
        self.inline, self.path = list(inline), path
        self.enabled = bool(inline) or path is not None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._keys: list[bytes] = []
        self.reload(strict=True)  # at start a bad file stops the service; later, reload keeps the last good keys

    def reload(self, strict: bool = False) -> int:
        """Read the keys file again (a bad read keeps the previous keys, or with ``strict`` raises
        ``config_error``); returns the number of keys."""
        with self._lock:
            keys = list(self.inline)
            if self.path is not None:
                try:
                    st = os.stat(self.path)
                    keys += read_keys_file(self.path)
                    self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                except (OSError, UnicodeDecodeError) as exc:
                    if strict:
                        raise CrfiqaError(f"API keys file {self.path} cannot be read: {exc}",
                                          code="config_error") from exc
                    log.warning("API keys file not read; keeping the previous keys", extra={"reason": str(exc)})
                    return len(self._keys)
            self._keys = [k.encode() for k in dict.fromkeys(keys)]
            self._checked = time.monotonic()
        log.info("API keys loaded", extra={"keys": len(self._keys)})
        return len(self._keys)

    def _maybe_reload(self) -> None:
        """Re-read the file when its mtime, size or inode changed (checked at most once a second)."""
        if self.path is None or time.monotonic() - self._checked < STAT_EVERY_S:
            return
        self._checked = time.monotonic()
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp:
            self.reload()

    def check(self, given: str | None) -> str | None:
        """The ``key_id`` of a valid key, else None; constant time over the configured keys."""
        if given is None:
            return None
        self._maybe_reload()
        ok = False
        raw = given.encode()
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(raw, key)
        return key_id(given) if ok else None


class RateLimiter:
    """One token bucket per key id: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # id -> (tokens, time)
        self._lock = threading.Lock()

    def take(self, ident: str) -> float | None:
        """Spend one token: None when allowed, else the seconds until one is available."""
        if self.rate <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) > MAX_BUCKETS:  # forget buckets that have refilled: they equal a new one
                self._buckets = {k: v for k, v in self._buckets.items()
                                 if v[0] + (now - v[1]) * self.rate < self.burst}
            tokens, then = self._buckets.get(ident, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens >= 1.0:
                self._buckets[ident] = (tokens - 1.0, now)
                return None
            self._buckets[ident] = (tokens, now)
            return (1.0 - tokens) / self.rate
