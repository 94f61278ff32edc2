"""Per-appid request quota (``--qps-limit``), answered with code 15 when exceeded.

A token bucket per appid with capacity = rate = the limit (capacity at least 1): a client pacing at exactly Q
requests a second never runs dry (the bucket refills as fast as it drains), a burst of up
to Q requests after a quiet second passes, and a client sending 2Q a second sustains Q,
so about half of its requests are refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class QuotaLimiter:
    def __init__(self, qps_limit: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        if qps_limit is not None and qps_limit <= 0:
            raise ValueError("qps_limit must be positive")
        self._rate = qps_limit
        # At least one whole token, or a limit below 1/s could never admit anything.
        self._capacity = max(qps_limit or 0.0, 1.0)
        self._clock = clock
        # Only appids that passed signature checks get here, so the dict stays small.
        self._buckets: dict[str, _Bucket] = {}

    @property
    def limit(self) -> float | None:
        return self._rate

    def try_acquire(self, appid: str) -> bool:
        """Take one request's token for ``appid``; False means "answer code 15"."""
        if self._rate is None:
            return True
        now = self._clock()
        bucket = self._buckets.get(appid)
        if bucket is None:
            bucket = self._buckets[appid] = _Bucket(tokens=self._capacity, updated=now)
        bucket.tokens = min(self._capacity, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False
