"""The global pacing limiter: no 1-second window above --qps, and AIMD on rate limiting."""

import asyncio
import time

from batchtag.ratelimit import AdaptiveRateLimiter, AimdPolicy


def max_in_any_window(stamps: list[float], window: float = 1.0) -> int:
    """The most timestamps that fall in any half-open window [t, t + window)."""
    stamps = sorted(stamps)
    best, start = 0, 0
    for end, t in enumerate(stamps):
        while t - stamps[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


async def starts_under(limiter: AdaptiveRateLimiter, workers: int, seconds: float) -> list[float]:
    stamps: list[float] = []

    async def worker():
        while True:
            await limiter.acquire()
            stamps.append(time.monotonic())
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return stamps


async def test_no_one_second_window_exceeds_qps_under_heavy_concurrency():
    qps = 20
    stamps = await starts_under(AdaptiveRateLimiter(qps), workers=64, seconds=3.2)
    assert max_in_any_window(stamps) <= qps
    assert len(stamps) >= qps * 3 - 2  # and it does not under-deliver


async def test_no_burst_after_idle():
    limiter = AdaptiveRateLimiter(10)
    await limiter.acquire()
    await asyncio.sleep(1.0)  # idle: a token bucket would have saved up a burst here
    stamps = await starts_under(limiter, workers=32, seconds=1.05)
    assert max_in_any_window(stamps) <= 10


async def test_rate_limit_answers_slow_the_whole_run_then_it_recovers():
    limiter = AdaptiveRateLimiter(
        50, AimdPolicy(decrease=0.5, increase_share=0.5, cooldown_s=0.0, probe_share=1.0)
    )
    limiter.on_rate_limited()
    assert limiter.rate == 25
    limiter.on_rate_limited()
    assert limiter.rate == 12.5
    slowed = await starts_under(limiter, workers=8, seconds=1.0)
    assert len(slowed) <= 14  # paced at the reduced rate for every worker
    for _ in range(20):
        await asyncio.sleep(0.1)
        limiter.on_success()
    assert limiter.rate == 50  # additive increase back to the configured ceiling, not above


async def test_one_burst_of_rate_limits_is_one_decrease():
    limiter = AdaptiveRateLimiter(40, AimdPolicy(decrease=0.5, cooldown_s=1.0))
    for _ in range(10):
        limiter.on_rate_limited()
    assert limiter.rate == 20 and limiter.decreases == 1


async def test_unlimited_until_the_server_objects():
    limiter = AdaptiveRateLimiter(None)
    assert len(await starts_under(limiter, workers=4, seconds=0.2)) > 1000
    limiter.on_rate_limited()
    assert limiter.rate is not None and limiter.rate > 0


async def test_near_the_refused_rate_it_creeps_instead_of_sawtoothing(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("batchtag.ratelimit.time.monotonic", lambda: clock[0])
    limiter = AdaptiveRateLimiter(
        100, AimdPolicy(decrease=0.8, increase_share=0.02, probe_from=0.95, probe_share=0.1)
    )
    limiter.rate = 50.0
    limiter.on_rate_limited()  # the server refused 50/s
    assert limiter.rate == 40.0
    for _ in range(8):  # fast climb back towards the refused rate: 2% of 50 a second
        clock[0] += 1.0
        limiter.on_success()
    assert limiter.rate == 48.0  # past 0.95 of it
    clock[0] += 10.0
    limiter.on_success()
    assert abs(limiter.rate - 49.0) < 1e-9  # then a tenth as fast: 10 s buys 1/s, not 10/s
