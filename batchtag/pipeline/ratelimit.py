"""Global request pacing with an adaptive (AIMD) rate.

Why not aiolimiter: its leaky bucket lets a full bucket of requests out at once, so a
1-second window can see up to twice the rate, and it has no notion of slowing down when
the server says "too many requests". Here request starts are spaced at least 1/rate
apart, with no saved-up burst after idle time, and the whole run (every worker shares
one limiter) backs off multiplicatively on a rate-limit answer and creeps back up
additively while answers are good, like TCP congestion control.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from batchtag.clock import SYSTEM_CLOCK, Clock


@dataclass
class AimdPolicy:
    decrease: float = 0.8  # rate *= decrease on a rate-limit answer
    increase_share: float = 0.02  # the rate grows by this share of its ceiling per second of good answers
    min_rate: float = 0.5
    cooldown_s: float = 1.0  # one decrease per this long: a burst of 15s is one signal
    probe_from: float = 0.95  # above this share of the last refused rate ...
    probe_share: float = 0.1  # ... climb at this fraction of the normal speed


class AdaptiveRateLimiter:
    def __init__(
        self, max_rate: float | None, policy: AimdPolicy | None = None, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        if max_rate is not None and max_rate <= 0:
            raise ValueError("rate must be positive")
        self.max_rate = max_rate
        self.policy = policy or AimdPolicy()
        self.clock = clock
        self.rate: float | None = max_rate  # None: unlimited until the server objects
        self._ceiling = max_rate
        self._next_start = 0.0
        self._last_decrease = -1e9
        self._last_increase = clock.monotonic()
        self._lock = asyncio.Lock()
        self._recent_starts: deque[float] = deque()
        self.decreases = 0
        self.waiting = 0  # requests inside acquire: queued for their turn

    async def acquire(self) -> None:
        """Wait for this request's turn; returns at its start time."""
        self.waiting += 1
        try:
            await self._acquire()
        finally:
            self.waiting -= 1

    async def _acquire(self) -> None:
        async with self._lock:
            now = self.clock.monotonic()
            if self.rate is not None:
                interval = 1.0 / self.rate
                start_at = max(self._next_start, self._window_opens())
                if start_at > now:
                    await self.clock.sleep(start_at - now)
                    now = self.clock.monotonic()
                # asyncio oversleeps by ~1 ms; scheduling from the wake-up time would lose that
                # on every request (5% at 50/s). Keep to the schedule unless far behind it.
                on_schedule = now - start_at < interval / 2
                self._next_start = (max(start_at, self._next_start) if on_schedule else now) + interval
            self._note_start(now)

    def _window_opens(self) -> float:
        """The earliest start that keeps every 1-second window at or under the rate: the
        schedule alone cannot, once a late wake-up has squeezed two starts together."""
        allowed = max(1, int(self.rate or 1))
        if len(self._recent_starts) < allowed:
            return 0.0
        return self._recent_starts[-allowed] + 1.0

    def _note_start(self, now: float) -> None:
        """Keep one second of start times: the window check, and the observed rate."""
        self._recent_starts.append(now)
        while self._recent_starts[0] < now - 1.0:
            self._recent_starts.popleft()

    def next_start(self) -> float:
        """When a request asked for now would start, behind the ones already waiting here:
        how an endpoint pool compares the headroom of its endpoints."""
        now = self.clock.monotonic()
        if self.rate is None:
            return now
        return max(now, self._next_start, self._window_opens()) + self.waiting / self.rate

    def observed_rate(self) -> float:
        return float(len(self._recent_starts))

    def on_rate_limited(self) -> None:
        now = self.clock.monotonic()
        if now - self._last_decrease < self.policy.cooldown_s:
            return
        current = self.rate if self.rate is not None else max(self.observed_rate(), 1.0)
        self._ceiling = current  # the latest rate the server refused
        self.rate = max(self.policy.min_rate, current * self.policy.decrease)
        self._last_decrease = now
        self._last_increase = now
        self.decreases += 1

    def on_success(self) -> None:
        if self.rate is None or self._ceiling is None:
            return
        now = self.clock.monotonic()
        elapsed = now - self._last_increase
        self._last_increase = now
        target = self.max_rate if self.max_rate is not None else self._ceiling * 2
        share = self.policy.increase_share
        if self.rate >= self.policy.probe_from * self._ceiling:
            share *= self.policy.probe_share  # near the rate that was refused: creep, don't sawtooth
        step = share * self._ceiling * elapsed
        self.rate = min(target, self.rate + step)
        if self.max_rate is None and self.rate >= target:
            self.rate = None  # fully recovered: unlimited again
            self._ceiling = None


LimiterFor = Callable[[str, float | None], AdaptiveRateLimiter]
"""The limiter of one endpoint, from its name and quota: a fresh one in a plain run; in a
cluster worker, the worker's share of that quota (``cluster/worker.py``)."""


def own_limiter(name: str, qps: float | None) -> AdaptiveRateLimiter:
    """A plain run paces each endpoint at its whole quota."""
    return AdaptiveRateLimiter(qps)
