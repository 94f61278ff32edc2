"""The HTTP client and its retry policy.

One shared aiohttp session (connection reuse) sends every request. Each attempt is paced
by the shared rate limiter and carries a reusable signature renewed every minute
(``signing.SignatureCache``: a retry after a long backoff never carries one about to
expire). Answers are sorted by ``codes``: transient failures are retried with exponential
backoff and jitter (tenacity, built only after a first attempt failed), permanent ones end
the item at once. ``embedded_client``: the same client over the tagger in this process
(``server/embedded.py``), handed raw image bytes instead of HTTP requests.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
    stop_any,
    wait_exponential,
    wait_exponential_jitter,
)

from batchtag import api, codes, signing
from batchtag.clock import SYSTEM_CLOCK, Clock
from batchtag.config import LOCAL
from batchtag.errors import ApiFailure, CredentialsRefused, EndpointUnreachable
from batchtag.pipeline.budget import RequestBudget
from batchtag.pipeline.payload import Payload
from batchtag.pipeline.ratelimit import AdaptiveRateLimiter

if TYPE_CHECKING:
    from batchtag.server.embedded import EmbeddedService


@dataclass
class RetryPolicy:
    """Retries as data: how often and how long to wait between attempts."""

    retries: int = 5  # extra attempts after the first, for transient failures only
    initial_wait_s: float = 0.2
    max_wait_s: float = 20.0
    jitter_s: float = 0.5
    clock: Clock = SYSTEM_CLOCK  # every wait of the client (retries, outage probes); tests pass a fake
    # Failures that settle (a dead link, a 4xx: codes.Retry.SETTLES) get this many quick
    # retries after this short wait, not the backoff above: they rarely heal within seconds,
    # and later runs try them again (up to --max-attempts runs).
    settle_retries: int = 1
    settle_wait_s: float = 0.2


CONNECT_TIMEOUT_S = 10.0
STARTUP_WAIT_S = 30.0  # an endpoint that has never answered: the run stops after this at most
PROBE_FIRST_WAIT_S = 1.0  # during an outage each sender probes again after this, doubling ...
PROBE_MAX_WAIT_S = 15.0  # ... up to this


@dataclass
class EndpointHealth:
    """Whether the endpoint answers at all, shared by every sender: it tells "this item
    failed" from "the service is not there". Any HTTP answer counts; only failures to
    connect (refused, no route, DNS, connect timeout) count against it."""

    name: str  # scheme://host:port only: messages never carry userinfo or paths
    outage_wait_s: float = 300.0  # answered before, silent now: probe this long, then stop
    startup_wait_s: float = STARTUP_WAIT_S
    clock: Clock = SYSTEM_CLOCK
    answered: bool = False
    first_try: float | None = None
    down_since: float | None = None
    last_error: str = ""

    def trying(self) -> None:
        if self.first_try is None:
            self.first_try = self.clock.monotonic()

    def on_answer(self) -> None:
        self.answered = True
        self.down_since = None

    def on_unreachable(self, why: str) -> None:
        self.last_error = why
        if self.down_since is None:
            self.down_since = self.clock.monotonic()

    def never_answered_too_long(self) -> bool:
        return (
            not self.answered
            and self.down_since is not None
            and self.first_try is not None
            and self.clock.monotonic() - self.first_try >= self.startup_wait_s
        )

    def outage_too_long(self) -> bool:
        return self.down_since is not None and self.clock.monotonic() - self.down_since >= self.outage_wait_s

    def error(self) -> EndpointUnreachable:
        if not self.answered:
            return EndpointUnreachable(
                f"{self.name} does not answer ({self.last_error}): check --endpoint and the network"
            )
        return EndpointUnreachable(
            f"{self.name} stopped answering ({self.last_error}) and was not back within "
            f"{self.outage_wait_s:g} s (outage-wait); finished records are in OUT: rerun to go on"
        )


@dataclass
class Answer:
    """How an item ended at the API: tags or the last failure, and the attempts it took."""

    code: int
    message: str
    tags: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 1
    http_status: int | None = None
    unreachable: bool = False
    endpoint: str | None = None  # the pool member that answered (several endpoints only)

    @property
    def ok(self) -> bool:
        return self.code == codes.OK

    @property
    def endpoint_down(self) -> bool:
        """The endpoint's failure, not the item's: a pool sends the item elsewhere."""
        return codes.says_endpoint_down(self.code, self.http_status, self.unreachable)


def failure_answer(failure: ApiFailure, attempts: int) -> Answer:
    """How an item ended when its last attempt failed."""
    return Answer(
        failure.code,
        failure.message,
        attempts=attempts,
        http_status=failure.http_status,
        unreachable=failure.unreachable,
    )


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
        session: aiohttp.ClientSession | None,
        endpoint: str,
        credentials: signing.Credentials,
        bucket: str,
        limiter: AdaptiveRateLimiter,
        policy: RetryPolicy,
        health: EndpointHealth | None = None,
        embedded: EmbeddedService | None = None,
        budget: RequestBudget | None = None,
        hand_back: bool = False,
    ) -> None:
        self._session = session
        self._url = api.detect_url(endpoint)
        self._signatures = signing.SignatureCache(credentials, bucket)
        self._limiter = limiter  # shared by every worker: the run's pacing is global
        self.appid = credentials.appid
        self.policy = policy
        self.health = health or EndpointHealth(endpoint, clock=policy.clock)
        self._embedded = embedded
        self.budget = budget  # --max-requests: every attempt takes one
        # In an endpoint pool: failures that are the endpoint's come back at once, unretried,
        # so the pool sends the item to another endpoint (endpoints.py).
        self.hand_back = hand_back

    @property
    def limiter(self) -> AdaptiveRateLimiter:
        return self._limiter

    def _hands_back(self, failure: ApiFailure) -> bool:
        return self.hand_back and codes.says_endpoint_down(
            failure.code, failure.http_status, failure.unreachable
        )

    async def attempt_item(self, payload: Payload) -> Answer:
        """The item's attempts on this endpoint alone, without the outage probing of
        ``detect``: an endpoint pool decides what an endpoint's failure means."""
        return await self._attempts(payload, self.policy.retries)

    @property
    def wants_body(self) -> bool:
        """HTTP needs the JSON body; the embedded tagger takes the image's bytes as they are."""
        return self._embedded is None

    async def detect(self, payload: Payload) -> Answer:
        """Tag one image. API and network failures of the item come back as an Answer;
        RunStopped when the failure is not the item's: credentials refused, or an endpoint
        that never answered or stays away past outage-wait."""
        answer = await self._attempts(payload, self.policy.retries)
        while self._in_an_outage(answer):
            answer = await self._probe_until_back(payload, answer)
            if self._back_but_failed(answer):
                again = await self._attempts(payload, self.policy.retries)
                again.attempts += answer.attempts
                answer = again
        if codes.stops_run(answer.code):
            raise CredentialsRefused(answer.code, answer.message)
        if answer.unreachable:
            raise self.health.error()
        return answer

    def _in_an_outage(self, answer: Answer) -> bool:
        """Unreachable now, but it answered before, and not for outage-wait yet: not this
        item's fault, so it is neither recorded nor given up."""
        return answer.unreachable and self.health.answered and not self.health.outage_too_long()

    @staticmethod
    def _back_but_failed(answer: Answer) -> bool:
        """The probe reached the endpoint, which answered with a transient failure (a 503,
        a busy code): the outage is over, and the item gets its retries again rather than
        being recorded as failed after a single try."""
        return not answer.unreachable and codes.is_transient(answer.code, answer.http_status)

    async def _probe_until_back(self, payload: Payload, first: Answer) -> Answer:
        """Probe with a doubling wait (tenacity, sleeping through the policy's clock) until
        the endpoint is back (another sender's answer counts) or outage-wait has passed;
        ``first`` (already unreachable) is replayed as attempt 1, so the first probe waits."""
        answer, replay = first, True
        probing = AsyncRetrying(
            retry=retry_if_result(self._in_an_outage),
            wait=wait_exponential(multiplier=PROBE_FIRST_WAIT_S, max=PROBE_MAX_WAIT_S),
            sleep=self.policy.clock.sleep,
        )
        async for attempt in probing:
            with attempt:
                if not replay:
                    probe = await self._attempts(payload, 0)
                    probe.attempts += answer.attempts
                    answer = probe
                replay = False
            outcome = attempt.retry_state.outcome
            if outcome is not None and not outcome.failed:
                attempt.retry_state.set_result(answer)  # what retry_if_result looks at
        return answer

    async def _attempts(self, payload: Payload, retries: int) -> Answer:
        """One attempt plus up to ``retries`` more for transient failures. The first runs
        bare (nearly all succeed); a tenacity retrier is built only after it failed."""
        try:
            tags = await self._attempt(payload)
        except ApiFailure as failure:
            if failure.retry_class is codes.Retry.SETTLES and retries > 0:
                return await self._settle_retry(payload, failure)
            if not failure.transient or retries < 1 or self._hands_back(failure):
                return failure_answer(failure, 1)
            return await self._retry(payload, retries, failure)
        self._limiter.on_success()
        return Answer(codes.OK, "success", tags, attempts=1, http_status=200)

    async def _settle_retry(self, payload: Payload, first: ApiFailure) -> Answer:
        """A failure that settles gets ``policy.settle_retries`` quick tries, no backoff."""
        failure, attempts = first, 1
        for _ in range(self.policy.settle_retries):
            await self.policy.clock.sleep(self.policy.settle_wait_s)
            attempts += 1
            try:
                tags = await self._attempt(payload)
            except ApiFailure as again:
                failure = again
                if again.retry_class is not codes.Retry.SETTLES:
                    break
                continue
            self._limiter.on_success()
            return Answer(codes.OK, "success", tags, attempts=attempts, http_status=200)
        return failure_answer(failure, attempts)

    async def _retry(self, payload: Payload, retries: int, first: ApiFailure) -> Answer:
        """Attempts 2.. under tenacity; attempt 1 (already failed) is replayed so the waits,
        stops and the rate-limit slow-down follow the policy as if tenacity had run it."""
        attempts = 0
        pending: ApiFailure | None = first
        retrying = AsyncRetrying(
            retry=retry_if_exception(
                lambda exc: isinstance(exc, ApiFailure) and exc.transient and not self._hands_back(exc)
            ),
            stop=stop_any(stop_after_attempt(retries + 1), self._gave_up_on_endpoint),
            wait=wait_exponential_jitter(
                multiplier=self.policy.initial_wait_s, max=self.policy.max_wait_s, jitter=self.policy.jitter_s
            ),
            before_sleep=self._slow_down_if_limited,
            sleep=self.policy.clock.sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    if pending is not None:
                        failure, pending = pending, None
                        raise failure
                    tags = await self._attempt(payload)
        except ApiFailure as failure:
            return failure_answer(failure, attempts)
        self._limiter.on_success()
        return Answer(codes.OK, "success", tags, attempts=attempts, http_status=200)

    def _gave_up_on_endpoint(self, state: RetryCallState) -> bool:
        """Stop retrying an item once an endpoint that never answered has had its chance
        (a host that drops packets makes each attempt wait for the connect timeout)."""
        return self.health.never_answered_too_long()

    def _slow_down_if_limited(self, state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        if isinstance(failure, ApiFailure) and failure.rate_limited:
            self._limiter.on_rate_limited()

    async def _attempt(self, payload: Payload) -> list[dict[str, Any]]:
        await self._limiter.acquire()
        if self.budget is not None:
            self.budget.spend()
        if self._embedded is not None:
            return await self._tag_embedded(payload)
        headers = {"Content-Type": "application/json", "Authorization": self._signatures.current()}
        self.health.trying()
        try:
            assert self._session is not None
            async with self._session.post(self._url, data=payload.body, headers=headers) as response:
                self.health.on_answer()
                body = await response.read()
                status = response.status
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            why = (
                "connection timed out" if isinstance(exc, TimeoutError) else "connection refused or no route"
            )
            if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error and exc.os_error.strerror:
                why = exc.os_error.strerror.lower()
            self.health.on_unreachable(why)
            raise ApiFailure(
                codes.CLIENT_TRANSPORT_ERROR, f"connection failed: {why}", unreachable=True
            ) from None
        except TimeoutError:
            raise ApiFailure(codes.CLIENT_TIMEOUT, "request timed out") from None
        except aiohttp.ClientError as exc:
            raise ApiFailure(
                codes.CLIENT_TRANSPORT_ERROR, f"connection failed: {exc or type(exc).__name__}"
            ) from None
        return parse_answer(status, body)

    async def _tag_embedded(self, payload: Payload) -> list[dict[str, Any]]:
        """The local tagger in this process: raw bytes in, the API's answer codes out."""
        from batchtag.errors import ApiError

        assert self._embedded is not None
        try:
            tags = await self._embedded.tag(image=payload.image, url=payload.url)
        except ApiError as exc:
            raise ApiFailure(exc.code, exc.message) from None
        return clean_tags(tags)


def embedded_client(
    service: EmbeddedService,
    limiter: AdaptiveRateLimiter,
    policy: RetryPolicy,
    budget: RequestBudget | None = None,
) -> TagClient:
    """A TagClient for the embedded tagger: no session, no signature, no HTTP."""
    credentials = signing.Credentials("embedded", "", "")
    return TagClient(None, LOCAL, credentials, "", limiter, policy, embedded=service, budget=budget)


@contextlib.asynccontextmanager
async def open_tag_client(
    endpoint: str,
    credentials: signing.Credentials,
    bucket: str,
    limiter: AdaptiveRateLimiter,
    policy: RetryPolicy,
    concurrency: int,
    timeout_s: float,
    health: EndpointHealth | None = None,
    budget: RequestBudget | None = None,
    hand_back: bool = False,
) -> AsyncIterator[TagClient]:
    """A TagClient on its own session: one connection per request in flight, at most, and
    ``timeout_s`` for each whole request (connecting: ``CONNECT_TIMEOUT_S`` at most, so a
    host that drops packets does not hold each attempt for the whole timeout)."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, CONNECT_TIMEOUT_S))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield TagClient(
            session,
            endpoint,
            credentials,
            bucket,
            limiter,
            policy,
            health,
            budget=budget,
            hand_back=hand_back,
        )
