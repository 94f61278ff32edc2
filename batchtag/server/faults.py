"""Fault injection for tests and benchmarks: added latency and transient failures.

Applied only to the API route, never to /healthz or /stats, so readiness checks and
benchmark bookkeeping stay truthful while the API misbehaves. A faulted request is
answered (or dropped) before any work, so it consumes no quota and no tagger time.
"""

from __future__ import annotations

import asyncio
import random
from enum import Enum


class Fault(Enum):
    HTTP_503 = "http_503"  # plain-text 503, as an overloaded proxy would answer
    CODE_203 = "code_203"  # the API's "internal processing timeout", HTTP 200
    DROP = "drop"  # the connection is closed without any answer


class FaultInjector:
    def __init__(
        self,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        error_rate: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError("inject_error_rate must be between 0 and 1")
        if latency_ms < 0 or jitter_ms < 0:
            raise ValueError("injected latency must not be negative")
        self.latency_s = latency_ms / 1000
        self.jitter_s = jitter_ms / 1000
        self.error_rate = error_rate
        self._rng = rng or random.Random()
        self.counts: dict[str, int] = {fault.value: 0 for fault in Fault}

    async def delay(self) -> None:
        seconds = self.latency_s + (self._rng.uniform(0, self.jitter_s) if self.jitter_s else 0.0)
        if seconds > 0:
            await asyncio.sleep(seconds)

    def pick_fault(self) -> Fault | None:
        """None for a normal answer, else which failure this request gets."""
        if self.error_rate <= 0 or self._rng.random() >= self.error_rate:
            return None
        fault = self._rng.choice(list(Fault))
        self.counts[fault.value] += 1
        return fault
