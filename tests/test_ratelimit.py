"""The global pacing limiter: no 1-second window above --qps, and AIMD on rate limiting.

On virtual time (tests.support.FakeClock): the limiter's arithmetic is checked exactly,
with a timer that oversleeps by up to 2 ms as a real event loop's does, and no test waits.
"""

import asyncio

from batchtag.pipeline.ratelimit import AdaptiveRateLimiter, AimdPolicy
from tests.support import FakeClock


def max_in_any_window(stamps: list[float], window: float = 1.0) -> int:
    """The most timestamps that fall in any half-open window [t, t + window)."""
    stamps = sorted(stamps)
    best, start = 0, 0
    for end, t in enumerate(stamps):
        while t - stamps[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


async def starts_under(
    limiter: AdaptiveRateLimiter, clock: FakeClock, workers: int, seconds: float
) -> list[float]:
    """Start times granted to ``workers`` competing tasks during ``seconds`` of virtual time."""
    stamps: list[float] = []
    end = clock.now + seconds

    async def worker():
        while clock.now < end:
            await limiter.acquire()
            if clock.now < end:
                stamps.append(clock.now)
            await asyncio.sleep(0)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return stamps


def limiter_on(clock: FakeClock, rate: float | None, policy: AimdPolicy | None = None) -> AdaptiveRateLimiter:
    return AdaptiveRateLimiter(rate, policy, clock=clock)


async def test_no_one_second_window_exceeds_qps_under_heavy_concurrency():
    qps = 20
    clock = FakeClock(oversleep=0.002)
    stamps = await starts_under(limiter_on(clock, qps), clock, workers=64, seconds=30.0)
    assert max_in_any_window(stamps) <= qps
    assert len(stamps) >= qps * 30 - 2, len(stamps)  # and it keeps to the schedule despite the oversleep


async def test_no_burst_after_idle():
    clock = FakeClock(oversleep=0.002)
    limiter = limiter_on(clock, 10)
    await limiter.acquire()
    clock.advance(1.0)  # idle: a token bucket would have saved up a burst here
    stamps = await starts_under(limiter, clock, workers=32, seconds=3.0)
    assert max_in_any_window(stamps) <= 10 and len(stamps) >= 29


async def test_rate_limit_answers_slow_the_whole_run_then_it_recovers():
    clock = FakeClock()
    limiter = limiter_on(
        clock, 50, AimdPolicy(decrease=0.5, increase_share=0.5, cooldown_s=0.0, probe_share=1.0)
    )
    limiter.on_rate_limited()
    assert limiter.rate == 25
    limiter.on_rate_limited()
    assert limiter.rate == 12.5
    slowed = await starts_under(limiter, clock, workers=8, seconds=1.0)
    assert 12 <= len(slowed) <= 13  # paced at the reduced rate for every worker together
    for _ in range(20):
        clock.advance(0.1)
        limiter.on_success()
    assert limiter.rate == 50  # additive increase back to the configured ceiling, not above


async def test_one_burst_of_rate_limits_is_one_decrease():
    clock = FakeClock()
    limiter = limiter_on(clock, 40, AimdPolicy(decrease=0.5, cooldown_s=1.0))
    for _ in range(10):
        limiter.on_rate_limited()
    assert limiter.rate == 20 and limiter.decreases == 1
    clock.advance(1.0)  # after the cooldown, a new signal is a new decrease
    limiter.on_rate_limited()
    assert limiter.decreases == 2


async def test_unlimited_until_the_server_objects():
    clock = FakeClock()
    limiter = limiter_on(clock, None)
    for _ in range(1000):
        await limiter.acquire()
    assert clock.slept == []  # never waited
    clock.advance(0.5)
    limiter.on_rate_limited()
    assert limiter.rate is not None and limiter.rate > 0
    await limiter.acquire()
    await limiter.acquire()
    assert clock.slept  # now it paces


async def test_near_the_refused_rate_it_creeps_instead_of_sawtoothing():
    clock = FakeClock()
    limiter = limiter_on(
        clock, 100, AimdPolicy(decrease=0.8, increase_share=0.02, probe_from=0.95, probe_share=0.1)
    )
    limiter.rate = 50.0
    limiter.on_rate_limited()  # the server refused 50/s
    assert limiter.rate == 40.0
    for _ in range(8):  # fast climb back towards the refused rate: 2% of 50 a second
        clock.advance(1.0)
        limiter.on_success()
    assert limiter.rate == 48.0  # past 0.95 of it
    clock.advance(10.0)
    limiter.on_success()
    assert abs(limiter.rate - 49.0) < 1e-9  # then a tenth as fast: 10 s buys 1/s, not 10/s
