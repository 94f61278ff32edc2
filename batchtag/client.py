"""The HTTP client and its retry policy.

One shared aiohttp session (connection reuse) sends every request. Each attempt is paced
by the shared rate limiter and signed afresh (a retry after a long backoff must not carry
an expired signature). Answers are sorted by ``codes``: transient failures are retried
with exponential backoff and jitter (tenacity), permanent ones end the item at once.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from batchtag import api, codes, signing
from batchtag.errors import ApiFailure
from batchtag.ratelimit import AdaptiveRateLimiter


@dataclass
class RetryPolicy:
    """Retries as data: how often and how long to wait between attempts."""

    retries: int = 5  # extra attempts after the first, for transient failures only
    initial_wait_s: float = 0.2
    max_wait_s: float = 20.0
    jitter_s: float = 0.5


@dataclass
class Answer:
    """How an item ended at the API: tags or the last failure, and the attempts it took."""

    code: int
    message: str
    tags: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 1
    http_status: int | None = None

    @property
    def ok(self) -> bool:
        return self.code == codes.OK


def parse_answer(status: int, body: bytes) -> list[dict[str, Any]]:
    """Tags from a response, or ApiFailure. Handles both API errors in a 200 body and plain
    HTTP errors (proxies, overloaded servers) with no JSON at all."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("code"), int):
        if status != 200:
            raise ApiFailure(codes.CLIENT_HTTP_ERROR, f"HTTP {status}", status)
        raise ApiFailure(codes.CLIENT_BAD_RESPONSE, "response is not the API's JSON", status)
    code = data["code"]
    if code != codes.OK:
        message = data.get("message") if isinstance(data.get("message"), str) else codes.message(code)
        raise ApiFailure(code, message, status)
    return clean_tags(data.get("tags"))


def clean_tags(tags: Any) -> list[dict[str, Any]]:
    if not isinstance(tags, list):
        raise ApiFailure(codes.CLIENT_BAD_RESPONSE, "response has no tag list")
    cleaned = []
    for tag in tags:
        if isinstance(tag, dict) and isinstance(tag.get("tag_name"), str):
            confidence = tag.get("tag_confidence")
            cleaned.append({"tag_name": tag["tag_name"], "tag_confidence": int(confidence or 0)})
    return cleaned


class TagClient:
    """Sends signed detect requests with retries; one per run, shared by all workers."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: str,
        credentials: signing.Credentials,
        bucket: str = "",
        limiter: AdaptiveRateLimiter | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._session = session
        self._url = api.detect_url(endpoint)
        self._credentials = credentials
        self._bucket = bucket
        self._limiter = limiter or AdaptiveRateLimiter(None)
        self.appid = credentials.appid
        self.policy = policy or RetryPolicy()

    async def detect(self, body: bytes) -> Answer:
        """Tag one image (the JSON ``body``); never raises for API or network failures."""
        attempts = 0
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, ApiFailure) and exc.transient),
            stop=stop_after_attempt(self.policy.retries + 1),
            wait=wait_exponential_jitter(
                multiplier=self.policy.initial_wait_s, max=self.policy.max_wait_s, jitter=self.policy.jitter_s
            ),
            before_sleep=self._slow_down_if_limited,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    tags = await self._attempt(body)
        except ApiFailure as failure:
            return Answer(failure.code, failure.message, attempts=attempts, http_status=failure.http_status)
        self._limiter.on_success()
        return Answer(codes.OK, "success", tags, attempts=attempts, http_status=200)

    def _slow_down_if_limited(self, state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        if isinstance(failure, ApiFailure) and failure.rate_limited:
            self._limiter.on_rate_limited()

    async def _attempt(self, body: bytes) -> list[dict[str, Any]]:
        await self._limiter.acquire()
        headers = {
            "Content-Type": "application/json",
            "Authorization": signing.sign(self._credentials, self._bucket),
        }
        try:
            async with self._session.post(self._url, data=body, headers=headers) as response:
                payload = await response.read()
                status = response.status
        except TimeoutError:
            raise ApiFailure(codes.CLIENT_TIMEOUT, "request timed out") from None
        except aiohttp.ClientError as exc:
            raise ApiFailure(
                codes.CLIENT_TRANSPORT_ERROR, f"connection failed: {exc or type(exc).__name__}"
            ) from None
        return parse_answer(status, payload)


@contextlib.asynccontextmanager
async def open_tag_client(
    endpoint: str,
    credentials: signing.Credentials,
    bucket: str,
    limiter: AdaptiveRateLimiter,
    policy: RetryPolicy,
    concurrency: int,
    timeout_s: float,
) -> AsyncIterator[TagClient]:
    """A TagClient on its own session: one connection per request in flight, at most, and
    ``timeout_s`` for each whole request."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield TagClient(session, endpoint, credentials, bucket, limiter, policy)
