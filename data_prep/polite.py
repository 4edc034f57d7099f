"""Polite crawling: a per-host cap on concurrent requests and on the request rate, and the server's Retry-After
honoured on 429 and 503 (img2dataset has none of these: its issues #62 and #436).

The limits hold per download process (img2dataset's threads of one process share a :class:`HostLimiter`); with
``prep.processes`` processes a host sees at most processes x per_host_connections connections. A Retry-After
pauses every request of that process to the host, not only the retried one. Counts go into the shard's fetch
notes: ``throttled`` (requests that waited for a host slot), ``retry_after`` (429/503 answers whose Retry-After
was honoured) and ``retry_after_too_long`` (ones asking for more than max_retry_after: the image is given up).
"""

from __future__ import annotations

import contextlib
import email.utils
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

RETRY_AFTER_STATUSES = (429, 503)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks for: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or ''}:{parts.port or ''}"


class HostLimiter:
    """Per-host slots (at most ``cap`` at once, starts at least 1 / rate apart) and Retry-After pauses."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._active: Counter = Counter()
        self._next_start: dict[str, float] = {}
        self._paused_until: dict[str, float] = {}
        self.peak: Counter = Counter()
        """Host -> most requests it had at once (for tests and logs)."""

    @contextlib.contextmanager
    def slot(self, url: str, cap: int, rate: float, deadline: float, notes: Counter | None = None):
        """Hold one of ``host``'s slots for the duration of a request; TimeoutError if none frees up before
        ``deadline`` (time.monotonic)."""
        host = host_of(url)
        waited = False
        with self._cv:
            while True:
                now = time.monotonic()
                ready_at = max(self._next_start.get(host, 0.0), self._paused_until.get(host, 0.0))
                if (cap <= 0 or self._active[host] < cap) and ready_at <= now:
                    break
                if now >= deadline:
                    raise TimeoutError(f"no request slot for {host} before the deadline")
                waited = True
                self._cv.wait(timeout=max(0.001, min(deadline, ready_at if ready_at > now else deadline) - now))
            self._active[host] += 1
            self.peak[host] = max(self.peak[host], self._active[host])
            if rate > 0:
                self._next_start[host] = max(now, self._next_start.get(host, 0.0)) + 1.0 / rate
            if waited and notes is not None:
                notes["throttled"] += 1
        try:
            yield
        finally:
            with self._cv:
                self._active[host] -= 1
                self._cv.notify_all()

    def retry_after(self, url: str, status: int, header: str | None, max_wait: float,
                    notes: Counter | None = None) -> float:
        """Seconds to wait before retrying after an HTTP error (0: the server said nothing; inf: it asked for
        more than ``max_wait``, give up); pauses the host for that long."""
        if status not in RETRY_AFTER_STATUSES:
            return 0.0
        seconds = retry_after_seconds(header)
        if seconds is None:
            return 0.0
        with self._cv:
            if seconds > max_wait:
                if notes is not None:
                    notes["retry_after_too_long"] += 1
                return float("inf")
            until = time.monotonic() + seconds
            host = host_of(url)
            self._paused_until[host] = max(self._paused_until.get(host, 0.0), until)
            if notes is not None:
                notes["retry_after"] += 1
            self._cv.notify_all()
        return seconds


LIMITER = HostLimiter()
"""The process's limiter, shared by its download threads."""
