"""The HTTP layer and its retry policy, against aioresponses mocks (end-to-end behaviour is
tested against the real server in test_pipeline.py)."""

import itertools
import time

import aiohttp
import pytest
from aioresponses import aioresponses

from batchtag import codes
from batchtag.api import DETECT_PATH
from batchtag.client import CredentialsRefused, RetryPolicy, TagClient
from batchtag.ratelimit import AdaptiveRateLimiter
from batchtag.signing import verify
from tests.support import CREDENTIALS as CREDS

ENDPOINT = "http://tagger.test"
URL = ENDPOINT + DETECT_PATH
FAST = RetryPolicy(retries=3, initial_wait_s=0.001, max_wait_s=0.002, jitter_s=0.0)

# What each API code should do to a client, written out independently of codes.py so a
# change to the table shows up here as a deliberate decision.
TRANSIENT_API_CODES = {7, 8, 9, 13, 15, 200, 201, 202, 203, -1308, -1403, -1506, -1507}
# Answers about the credentials or the account (signature, appid, secret id, bucket): the
# run stops instead of recording them for every item.
RUN_STOPPING_API_CODES = {4, 5, 6, 10, 11, 12, 14, 16}


def answer(code, tags=None):
    return {"code": code, "message": codes.message(code), "tags": tags or []}


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def client_for(session, policy=FAST, limiter=None):
    return TagClient(session, ENDPOINT, CREDS, "bkt", limiter, policy)


@pytest.mark.parametrize("code", sorted(c for c in codes.API_CODES if c != codes.OK))
async def test_every_api_code_follows_the_retry_table(session, code):
    with aioresponses() as mocked:
        mocked.post(URL, payload=answer(code), repeat=True)
        if code in RUN_STOPPING_API_CODES:
            with pytest.raises(CredentialsRefused, match=f"code {code}"):
                await client_for(session).detect(b"{}")
        else:
            result = await client_for(session).detect(b"{}")
        calls = len(mocked.requests[("POST", aiohttp.client.URL(URL))])
    assert codes.is_transient(code) == (code in TRANSIENT_API_CODES)
    assert codes.stops_run(code) == (code in RUN_STOPPING_API_CODES)
    if code in RUN_STOPPING_API_CODES:
        assert calls == 1
        return
    assert result.code == code and result.message == codes.message(code)
    expected = FAST.retries + 1 if code in TRANSIENT_API_CODES else 1
    assert calls == expected == result.attempts


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (429, True),
        (408, True),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (413, False),
    ],
)
async def test_plain_http_errors_without_json(session, status, transient):
    with aioresponses() as mocked:
        mocked.post(URL, status=status, body="<html>oops</html>", repeat=True)
        result = await client_for(session).detect(b"{}")
    assert result.code == codes.CLIENT_HTTP_ERROR and result.http_status == status
    assert result.attempts == (FAST.retries + 1 if transient else 1)


async def test_transient_then_success_records_attempts(session):
    with aioresponses() as mocked:
        mocked.post(URL, status=503, body="busy")
        mocked.post(URL, payload=answer(203))
        mocked.post(URL, exception=aiohttp.ServerDisconnectedError())
        mocked.post(URL, payload=answer(0, [{"tag_name": "猫", "tag_confidence": 91}]))
        result = await client_for(session).detect(b"{}")
    assert result.ok and result.attempts == 4
    assert result.tags == [{"tag_name": "猫", "tag_confidence": 91}]


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TimeoutError(), codes.CLIENT_TIMEOUT),
        (aiohttp.ClientConnectionError("refused"), codes.CLIENT_TRANSPORT_ERROR),
    ],
)
async def test_transport_failures_are_retried(session, exc, code):
    with aioresponses() as mocked:
        mocked.post(URL, exception=exc, repeat=True)
        result = await client_for(session).detect(b"{}")
    assert result.code == code and result.attempts == FAST.retries + 1


async def test_a_200_that_is_not_the_api_json_is_retried(session):
    with aioresponses() as mocked:
        mocked.post(URL, status=200, body="not json")
        mocked.post(URL, payload=answer(0))
        result = await client_for(session).detect(b"{}")
    assert result.ok and result.attempts == 2


async def test_backoff_actually_waits(session):
    policy = RetryPolicy(retries=3, initial_wait_s=0.1, max_wait_s=1.0, jitter_s=0.0)
    stamps = []

    def record(url, **kwargs):
        stamps.append(time.monotonic())

    with aioresponses() as mocked:
        mocked.post(URL, payload=answer(203), repeat=True, callback=record)
        await client_for(session, policy).detect(b"{}")
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    # exponential: about 0.1, 0.2, 0.4 s
    assert len(gaps) == 3
    assert gaps[0] >= 0.09 and gaps[1] >= 0.18 and gaps[2] >= 0.36


async def test_each_attempt_is_signed_afresh_and_verifies(session):
    seen = []

    def record(url, **kwargs):
        seen.append(kwargs["headers"]["Authorization"])

    with aioresponses() as mocked:
        mocked.post(URL, payload=answer(203), callback=record)
        mocked.post(URL, payload=answer(0), callback=record)
        await client_for(session).detect(b"{}")
    assert len(seen) == 2 and seen[0] != seen[1]
    for auth in seen:
        assert verify(auth, CREDS.appid, "bkt", lambda k: CREDS if k == CREDS.secret_id else None)


async def test_rate_limit_answer_slows_the_shared_limiter(session):
    limiter = AdaptiveRateLimiter(100.0)
    with aioresponses() as mocked:
        mocked.post(URL, payload=answer(codes.RATE_LIMITED))
        mocked.post(URL, payload=answer(0))
        result = await client_for(session, limiter=limiter).detect(b"{}")
    assert result.ok and limiter.rate is not None and limiter.rate < 100.0 and limiter.decreases == 1
