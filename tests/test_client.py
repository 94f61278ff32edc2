"""The HTTP layer and its retry policy, against aioresponses mocks (end-to-end behaviour is
tested against the real server in test_pipeline.py)."""

import itertools
from dataclasses import replace

import aiohttp
import pytest
from aioresponses import aioresponses

from batchtag import codes
from batchtag.api import DETECT_PATH
from batchtag.errors import EndpointUnreachable
from batchtag.pipeline.client import CredentialsRefused, EndpointHealth, RetryPolicy, TagClient
from batchtag.pipeline.payload import Payload
from batchtag.pipeline.ratelimit import AdaptiveRateLimiter
from batchtag.signing import verify
from tests.support import CREDENTIALS as CREDS
from tests.support import FakeClock

ENDPOINT = "http://tagger.test"
URL = ENDPOINT + DETECT_PATH
FAST = RetryPolicy(retries=3, initial_wait_s=0.001, max_wait_s=0.002, jitter_s=0.0)

# What each API code should do to a client, written out independently of codes.py so a
# change to the table shows up here as a deliberate decision.
TRANSIENT_API_CODES = {7, 8, 9, 13, 15, 200, 201, 202, 203}
# Failures that do not heal within seconds (the image behind a url is not there): one quick
# retry in the run, later runs up to --max-attempts (issue 19).
SETTLING_API_CODES = {-1308, -1403, -1506, -1507}
# Answers about the credentials or the account (signature, appid, secret id, bucket): the
# run stops instead of recording them for every item.
RUN_STOPPING_API_CODES = {4, 5, 6, 10, 11, 12, 14, 16}


def answer(code, tags=None):
    return {"code": code, "message": codes.message(code), "tags": tags or []}


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def clock():
    """Virtual time for the client's limiter and backoff: no test here waits for real."""
    return FakeClock()


@pytest.fixture
def client_for(session, clock):
    def make(policy=FAST, limiter=None):
        limiter = limiter or AdaptiveRateLimiter(None, clock=clock)
        return TagClient(session, ENDPOINT, CREDS, "bkt", limiter, replace(policy, clock=clock))

    return make


@pytest.mark.parametrize("code", sorted(c for c in codes.API_CODES if c != codes.OK))
async def test_every_api_code_follows_the_retry_table(client_for, code):
    with aioresponses() as mocked:
        mocked.post(URL, payload=answer(code), repeat=True)
        if code in RUN_STOPPING_API_CODES:
            with pytest.raises(CredentialsRefused, match=f"code {code}"):
                await client_for().detect(Payload(b"{}"))
        else:
            result = await client_for().detect(Payload(b"{}"))
        calls = len(mocked.requests[("POST", aiohttp.client.URL(URL))])
    assert codes.is_transient(code) == (code in TRANSIENT_API_CODES)
    assert codes.settles(code) == (code in SETTLING_API_CODES)
    assert codes.stops_run(code) == (code in RUN_STOPPING_API_CODES)
    if code in RUN_STOPPING_API_CODES:
        assert calls == 1
        return
    assert result.code == code and result.message == codes.message(code)
    expected = FAST.retries + 1 if code in TRANSIENT_API_CODES else 2 if code in SETTLING_API_CODES else 1
    assert calls == expected == result.attempts


@pytest.mark.parametrize(
    ("status", "attempts"),
    [
        (500, FAST.retries + 1),
        (502, FAST.retries + 1),
        (503, FAST.retries + 1),
        (504, FAST.retries + 1),
        (429, FAST.retries + 1),
        (408, FAST.retries + 1),
        (400, 2),  # 4xx settles: one quick retry, later runs up to --max-attempts
        (401, 2),
        (403, 2),
        (404, 2),
        (413, 2),
        (501, 1),  # a 5xx that says the request can never work: permanent
    ],
)
async def test_plain_http_errors_without_json(client_for, clock, status, attempts):
    with aioresponses() as mocked:
        mocked.post(URL, status=status, body="<html>oops</html>", repeat=True)
        result = await client_for().detect(Payload(b"{}"))
    assert result.code == codes.CLIENT_HTTP_ERROR and result.http_status == status
    assert result.attempts == attempts
    if attempts == 2:
        assert clock.slept == [FAST.settle_wait_s]  # one short wait, no backoff


async def test_transient_then_success_records_attempts(client_for):
    with aioresponses() as mocked:
        mocked.post(URL, status=503, body="busy")
        mocked.post(URL, payload=answer(203))
        mocked.post(URL, exception=aiohttp.ServerDisconnectedError())
        mocked.post(URL, payload=answer(0, [{"tag_name": "猫", "tag_confidence": 91}]))
        result = await client_for().detect(Payload(b"{}"))
    assert result.ok and result.attempts == 4
    assert result.tags == [{"tag_name": "猫", "tag_confidence": 91}]


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TimeoutError(), codes.CLIENT_TIMEOUT),
        (aiohttp.ClientConnectionError("refused"), codes.CLIENT_TRANSPORT_ERROR),
    ],
)
async def test_transport_failures_are_retried(client_for, exc, code):
    with aioresponses() as mocked:
        mocked.post(URL, exception=exc, repeat=True)
        result = await client_for().detect(Payload(b"{}"))
    assert result.code == code and result.attempts == FAST.retries + 1


async def test_a_200_that_is_not_the_api_json_is_retried(client_for):
    with aioresponses() as mocked:
        mocked.post(URL, status=200, body="not json")
        mocked.post(URL, payload=answer(0))
        result = await client_for().detect(Payload(b"{}"))
    assert result.ok and result.attempts == 2


async def test_backoff_waits_exponentially_between_attempts(client_for, clock):
    policy = RetryPolicy(retries=3, initial_wait_s=0.1, max_wait_s=1.0, jitter_s=0.0)
    stamps = []

    def record(url, **kwargs):
        stamps.append(clock.monotonic())

    with aioresponses() as mocked:
        mocked.post(URL, payload=answer(203), repeat=True, callback=record)
        result = await client_for(policy).detect(Payload(b"{}"))
    assert result.attempts == 4
    assert clock.slept == pytest.approx([0.1, 0.2, 0.4])  # exponential, through the policy's sleep
    assert [round(b - a, 6) for a, b in itertools.pairwise(stamps)] == [0.1, 0.2, 0.4]


async def test_backoff_is_capped_and_jittered(client_for, clock):
    policy = RetryPolicy(retries=4, initial_wait_s=0.5, max_wait_s=1.0, jitter_s=0.25)
    with aioresponses() as mocked:
        mocked.post(URL, payload=answer(203), repeat=True)
        await client_for(policy).detect(Payload(b"{}"))
    assert len(clock.slept) == 4
    assert all(0.5 <= wait <= 1.0 for wait in clock.slept)  # never above max_wait_s
    assert clock.slept[0] <= 0.75  # first wait: initial plus at most the jitter


async def test_each_attempt_carries_a_signature_that_verifies(client_for):
    seen = []

    def record(url, **kwargs):
        seen.append(kwargs["headers"]["Authorization"])

    with aioresponses() as mocked:
        mocked.post(URL, payload=answer(203), callback=record)
        mocked.post(URL, payload=answer(0), callback=record)
        await client_for().detect(Payload(b"{}"))
    assert len(seen) == 2  # one reusable signature within a minute (test_signing: SignatureCache)
    for auth in seen:
        assert verify(auth, CREDS.appid, "bkt", lambda k: CREDS if k == CREDS.secret_id else None)


async def test_rate_limit_answer_slows_the_shared_limiter(client_for, clock):
    limiter = AdaptiveRateLimiter(100.0, clock=clock)
    with aioresponses() as mocked:
        mocked.post(URL, payload=answer(codes.RATE_LIMITED))
        mocked.post(URL, payload=answer(0))
        result = await client_for(limiter=limiter).detect(Payload(b"{}"))
    assert result.ok and limiter.decreases == 1
    assert limiter.rate == pytest.approx(80.0, abs=0.1)  # cut by 0.8, then a hair of recovery


@pytest.mark.parametrize(
    "rate_limited", [{"payload": answer(codes.RATE_LIMITED)}, {"status": 429, "body": "slow down"}]
)
async def test_both_rate_limit_signals_make_an_unlimited_run_pace_itself(client_for, clock, rate_limited):
    limiter = AdaptiveRateLimiter(None, clock=clock)
    with aioresponses() as mocked:
        mocked.post(URL, **rate_limited, repeat=True)
        result = await client_for(limiter=limiter).detect(Payload(b"{}"))
    assert result.attempts == FAST.retries + 1
    # every refusal after the first waits out the cooldown (paced at <= 1/s), so each one is
    # a further decrease: 0.8, 0.64, 0.512 requests a second
    assert limiter.decreases == FAST.retries and limiter.rate == pytest.approx(0.512)
    assert sum(clock.slept) > 2.5  # virtual seconds of pacing the test did not wait for


# --- an endpoint that answered and then went away, on virtual time -------------------------

GONE = aiohttp.ConnectionTimeoutError()  # no connection at all: the endpoint, not the item


async def test_an_outage_is_probed_with_doubling_waits_until_the_endpoint_is_back(client_for, clock):
    client = client_for(replace(FAST, retries=0))
    with aioresponses() as mocked:
        mocked.post(URL, payload=answer(codes.OK))
        for _ in range(3):
            mocked.post(URL, exception=GONE)
        mocked.post(URL, payload=answer(codes.OK))
        assert (await client.detect(Payload(b"{}"))).ok
        result = await client.detect(Payload(b"{}"))
    assert result.ok and result.attempts == 4  # the failed attempt, two failed probes, the answer
    assert clock.slept == [1.0, 2.0, 4.0]


async def test_an_endpoint_back_from_an_outage_with_a_503_gives_the_item_its_retries(client_for, clock):
    """The probe reaches the endpoint again but gets a transient failure: the outage is over
    and the item is retried as usual, not recorded as failed after that one try (seen once
    in a loaded full-suite run under 30 % injected faults)."""
    client = client_for(replace(FAST, retries=2))
    with aioresponses() as mocked:
        mocked.post(URL, payload=answer(codes.OK))
        for _ in range(3):  # the first attempt and its two retries: no connection
            mocked.post(URL, exception=GONE)
        mocked.post(URL, status=503, body="busy")  # the probe: back, but busy
        mocked.post(URL, payload=answer(codes.OK))
        assert (await client.detect(Payload(b"{}"))).ok
        result = await client.detect(Payload(b"{}"))
    assert result.ok and result.attempts == 5


async def test_an_outage_longer_than_outage_wait_stops_the_run(session, clock):
    health = EndpointHealth(ENDPOINT, outage_wait_s=30.0, clock=clock)
    limiter = AdaptiveRateLimiter(None, clock=clock)
    client = TagClient(
        session, ENDPOINT, CREDS, "bkt", limiter, replace(FAST, retries=0, clock=clock), health
    )
    with aioresponses() as mocked:
        mocked.post(URL, payload=answer(codes.OK))
        mocked.post(URL, exception=GONE, repeat=True)
        assert (await client.detect(Payload(b"{}"))).ok
        with pytest.raises(EndpointUnreachable, match="stopped answering"):
            await client.detect(Payload(b"{}"))
    assert clock.slept == [1.0, 2.0, 4.0, 8.0, 15.0]  # doubling, capped at 15 s, 30 s in all
