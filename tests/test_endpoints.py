"""The endpoint pool on virtual time (tests.support.FakeClock): choice by headroom, failover
with probing back-off, credentials refused by one member, the run's stop when none is left.

Each member here is a stand-in for a ``TagClient`` with a real ``AdaptiveRateLimiter`` on
the fake clock and a script that says how the endpoint answers at a given time. The pool
is driven by one sender at a time, so the virtual clock moves only through the limiters'
and the pool's own waits. End to end against real servers: tests/test_endpoints_live.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Callable

import pytest

from batchtag import codes
from batchtag.errors import CredentialsRefused, EndpointUnreachable
from batchtag.pipeline.budget import RequestBudget, RequestLimitReached
from batchtag.pipeline.client import Answer
from batchtag.pipeline.endpoints import EndpointPool, Member, State
from batchtag.pipeline.payload import Payload, body_bytes, with_appid
from batchtag.pipeline.ratelimit import AdaptiveRateLimiter
from tests.support import FakeClock

Script = Callable[[float], Answer]


def ok(now: float) -> Answer:
    return Answer(codes.OK, "success", [{"tag_name": "x", "tag_confidence": 90}], http_status=200)


def refused_connection(now: float) -> Answer:
    return Answer(codes.CLIENT_TRANSPORT_ERROR, "connection failed: connection refused", unreachable=True)


def http_503(now: float) -> Answer:
    return Answer(codes.CLIENT_HTTP_ERROR, "HTTP 503", http_status=503)


def bad_key(now: float) -> Answer:
    return Answer(codes.SIGNATURE_MISMATCH, "signature mismatch", http_status=200)


def timed_out(now: float) -> Answer:
    return Answer(codes.CLIENT_TIMEOUT, "request timed out")


class FakeEndpoint:
    """What the pool uses of a TagClient: its limiter, appid and ``attempt_item``."""

    def __init__(self, clock: FakeClock, qps: float | None, script: Script, appid: str = "1") -> None:
        self.clock = clock
        self.limiter = AdaptiveRateLimiter(qps, clock=clock)
        self.appid = appid
        self.script = script
        self.calls: list[tuple[float, bytes]] = []

    async def attempt_item(self, payload: Payload) -> Answer:
        await self.limiter.acquire()
        self.calls.append((self.clock.now, payload.body))
        return self.script(self.clock.now)


def pool_of(clock: FakeClock, *endpoints: FakeEndpoint, **options) -> EndpointPool:
    members = [Member(f"ep{i}", e) for i, e in enumerate(endpoints)]  # type: ignore[arg-type]
    return EndpointPool(members, clock=clock, **options)


def payload(n: int, appid: str = "1") -> Payload:
    return Payload(body_bytes(appid, "", "url", f"https://example.com/{n}.jpg".encode()))


async def send_all(pool: EndpointPool, n: int) -> list[Answer]:
    return [await pool.detect(payload(i)) for i in range(n)]


def test_quotas_add_up_in_proportion():
    """Quotas 2 and 6 a second: the requests split 1:3 and 400 of them take 50 s, as at 8/s."""
    clock = FakeClock()
    slow, fast = FakeEndpoint(clock, 2.0, ok), FakeEndpoint(clock, 6.0, ok)
    pool = pool_of(clock, slow, fast)
    start = clock.now
    answers = asyncio.run(send_all(pool, 400))
    assert all(a.ok for a in answers)
    assert len(slow.calls) == 100 and len(fast.calls) == 300
    assert clock.now - start == pytest.approx(400 / 8.0, rel=0.02)
    assert Counter(a.endpoint for a in answers) == {"ep0": 100, "ep1": 300}


def test_no_qps_splits_by_weight_of_load():
    """Without quotas the member with the fewest requests in flight per unit of weight wins."""
    clock = FakeClock()
    a, b = FakeEndpoint(clock, None, ok), FakeEndpoint(clock, None, ok)
    pool = EndpointPool([Member("a", a, weight=1.0), Member("b", b, weight=3.0)], clock=clock)  # type: ignore[arg-type]
    a_member, b_member = pool.members
    a_member.in_flight, b_member.in_flight = 1, 2  # loads 1.0 and 0.67: b has more headroom
    assert asyncio.run(pool.choose()) is b_member


def test_failover_moves_items_probes_with_backoff_and_takes_the_member_back():
    """ep0 refuses connections from t=10 to t=30: its items go to ep1 (each answered once,
    none lost); probes at 1, 2, 4, 5, 5 ... s after it went out; back in after a probe answers."""
    clock = FakeClock(start=0.0)
    down = lambda now: refused_connection(now) if 10 <= now < 30 else ok(now)  # noqa: E731
    flaky, steady = FakeEndpoint(clock, 4.0, down), FakeEndpoint(clock, 4.0, ok)
    pool = pool_of(clock, flaky, steady)
    answers = asyncio.run(send_all(pool, 400))
    assert all(a.ok for a in answers), "no item lost"
    ok_calls = [t for t, _ in flaky.calls if not 10 <= t < 30]
    assert len(ok_calls) + len(steady.calls) == 400, "every item answered ok by exactly one endpoint"
    failed = [t for t, _ in flaky.calls if 10 <= t < 30]
    gaps = [round(b - a) for a, b in itertools.pairwise(failed)]
    assert gaps[:5] == [1, 2, 4, 5, 5], f"probes back off: {failed}"
    assert pool.moved == len(failed)
    back = min(t for t in ok_calls if t >= 30)
    assert back - 30 <= 5.5, "back in at the first probe after its return (probe wait at most 5 s)"
    assert pool.members[0].state is State.UP
    late = [t for t in ok_calls if t > back + 1]
    assert len(late) > 10, "it takes its share again"


def test_requests_in_flight_when_a_member_goes_out_do_not_push_its_probe_back():
    """Eight requests in flight fail together when an endpoint dies: one signal, so its
    first probe is still 1 s away, not 2**8 s."""
    clock = FakeClock(start=0.0)
    pool = pool_of(clock, FakeEndpoint(clock, 4.0, ok), FakeEndpoint(clock, 4.0, ok))
    member = pool.members[0]
    for _ in range(8):
        pool.take_out(member, "connection refused")
    assert member.state is State.DOWN and member.next_probe == 1.0 and member.probe_wait == 1.0
    pool.take_out(member, "connection refused", probe=True)
    assert member.probe_wait == 2.0 and member.next_probe == 2.0


def test_5xx_and_busy_codes_take_a_member_out_but_timeouts_do_not_move_the_item():
    """A 503 answer definitely did not tag the item: it moves. A timeout may have been
    processed: the pool hands its answer back (the item's own error, not moved)."""
    clock = FakeClock()
    sick, good = FakeEndpoint(clock, 5.0, http_503), FakeEndpoint(clock, 1.0, ok)
    pool = pool_of(clock, sick, good)
    answer = asyncio.run(pool.detect(payload(1)))
    assert answer.ok and answer.endpoint == "ep1" and len(sick.calls) == 1
    assert pool.members[0].state is State.DOWN

    clock = FakeClock()
    slow, other = FakeEndpoint(clock, 5.0, timed_out), FakeEndpoint(clock, 1.0, ok)
    pool = pool_of(clock, slow, other)
    answer = asyncio.run(pool.detect(payload(1)))
    assert answer.code == codes.CLIENT_TIMEOUT and answer.endpoint == "ep0"
    assert other.calls == [] and pool.members[0].state is State.UP


def test_refused_credentials_stop_only_that_member(caplog):
    clock = FakeClock()
    wrong, right = FakeEndpoint(clock, 5.0, bad_key), FakeEndpoint(clock, 1.0, ok)
    members = [Member("eu", wrong), Member("https://ap.example:8443", right)]  # type: ignore[arg-type]
    pool = EndpointPool(members, clock=clock)
    with caplog.at_level(logging.WARNING, logger="batchtag"):
        answers = asyncio.run(send_all(pool, 20))
    assert all(a.ok and a.endpoint == "https://ap.example:8443" for a in answers)
    assert len(wrong.calls) == 1, "a refused member gets no second request"
    lines = [r.getMessage() for r in caplog.records if "refused the credentials" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("eu refused the credentials (code 6")


def test_the_run_stops_when_every_member_refused():
    clock = FakeClock()
    pool = pool_of(clock, FakeEndpoint(clock, 5.0, bad_key), FakeEndpoint(clock, 5.0, bad_key))
    with pytest.raises(CredentialsRefused, match="by every endpoint"):
        asyncio.run(send_all(pool, 3))


def test_the_run_stops_after_outage_wait_with_every_member_out():
    clock = FakeClock(start=0.0)
    gone_at_5 = lambda now: refused_connection(now) if now >= 5 else ok(now)  # noqa: E731
    a, b = FakeEndpoint(clock, 2.0, gone_at_5), FakeEndpoint(clock, 2.0, gone_at_5)
    pool = pool_of(clock, a, b, outage_wait_s=60.0)

    async def until_stopped() -> float:
        with pytest.raises(EndpointUnreachable, match="outage-wait"):
            await send_all(pool, 10_000)
        return clock.now

    stopped_at = asyncio.run(until_stopped())
    assert 65 <= stopped_at <= 5 + 60 + 15 + 1, "stopped after outage-wait, within one probe wait"


def test_bodies_are_reheaded_for_each_members_appid():
    clock = FakeClock()
    first, second = FakeEndpoint(clock, 4.0, ok, appid="1001"), FakeEndpoint(clock, 4.0, ok, appid="2002")
    pool = pool_of(clock, first, second)

    async def two() -> None:
        for i in range(8):
            await pool.detect(payload(i, appid="1001"))

    asyncio.run(two())
    assert first.calls and second.calls
    assert all(body.startswith(b'{"appid":"1001",') for _, body in first.calls)
    assert all(body.startswith(b'{"appid":"2002",') for _, body in second.calls)
    image = body_bytes("1", "b", "image", b"QUJD")
    assert with_appid(image, "1", "22", "b") == body_bytes("22", "b", "image", b"QUJD")


def test_request_budget_refuses_the_request_after_the_last():
    budget = RequestBudget(2)
    budget.spend()
    budget.spend()
    with pytest.raises(RequestLimitReached):
        budget.spend()
    assert budget.spent == 2 and budget.exhausted
