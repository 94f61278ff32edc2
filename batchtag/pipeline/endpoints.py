"""Several endpoints as one client: quotas that add up, failover without loss.

An ``EndpointPool`` stands where the run's one ``TagClient`` stands (same ``detect``,
``appid``, ``wants_body``). Each member is a ``TagClient`` of its own: its own session,
credentials, signatures, rate limiter and AIMD state (``ratelimit.py``, one instance per
endpoint), so a code 15 from one endpoint slows that endpoint only.

Choice by headroom: each request goes to the member that can start it soonest (its
limiter's next free start behind the requests already queued there, ``next_start``); with
no ``qps`` that is "now" for all and the fewest requests in flight per unit of ``weight``
wins. So endpoints with quotas Q and 3Q get a quarter and three quarters of the requests
and the run goes at 4Q.

Failover: a member whose request definitely failed for the endpoint's reasons (no
connection, HTTP 5xx, the API's busy/internal codes: ``codes.says_endpoint_down``) is taken
out at once, without retrying there, and the item goes to another member. A taken-out
member is probed with back-off (1 s, doubling to 5 s): the probe is the next item itself,
so a probe costs no extra request and an item whose probe fails simply goes elsewhere.
One that answers is back in. A member that refuses its credentials is out for the run,
with one line naming it (by ``name`` or scheme://host:port, never a secret); the run
stops only when every member refused, or when none has answered for ``outage_wait``
(``startup_wait`` if none ever answered).

No item is lost or sent twice because of a switch. An item moves to another member only
when its request there definitely did not tag it (refused connection, an error answer).
A request that timed out, or whose connection broke after it was sent, may have been
processed: it is retried on the same endpoint under the normal retry policy (as with one
endpoint), never moved; if that endpoint then refuses connections, that later attempt
definitely failed and the item moves. So an item is answered ok by at most one endpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from batchtag import codes
from batchtag.clock import SYSTEM_CLOCK, Clock
from batchtag.endpoint_specs import EndpointSpec
from batchtag.errors import CredentialsRefused, EndpointUnreachable
from batchtag.pipeline.budget import RequestBudget
from batchtag.pipeline.client import Answer, EndpointHealth, RetryPolicy, TagClient, open_tag_client
from batchtag.pipeline.payload import Payload, with_appid
from batchtag.pipeline.ratelimit import LimiterFor, own_limiter
from batchtag.signing import Credentials

log = logging.getLogger("batchtag")

PROBE_FIRST_WAIT_S = 1.0
PROBE_MAX_WAIT_S = 5.0  # so an endpoint back after a long outage takes its share within ~5 s
IDLE_POLL_S = 0.05  # every member out and its probe in flight: look again this often


class State(enum.Enum):
    UP = "up"
    DOWN = "down"  # probed with back-off
    REFUSED = "refused"  # credentials refused: out for the run


@dataclass
class Member:
    """One endpoint of the pool and what the pool knows of it."""

    name: str
    client: TagClient
    weight: float = 1.0
    state: State = State.UP
    in_flight: int = 0
    answered: bool = False
    down_since: float | None = None
    next_probe: float = 0.0
    probe_wait: float = PROBE_FIRST_WAIT_S
    probing: bool = False
    last_error: str = ""
    sent: int = 0  # items this member answered (ok or the item's own error)

    def wait_before_start(self, now: float) -> float:
        return max(0.0, self.client.limiter.next_start() - now)

    def load(self) -> float:
        return self.in_flight / self.weight


class EndpointPool:
    """The run's client over several endpoints (see the module docstring)."""

    def __init__(
        self,
        members: Sequence[Member],
        bucket: str = "",
        outage_wait_s: float = 300.0,
        startup_wait_s: float = 30.0,
        clock: Clock = SYSTEM_CLOCK,
        probe_first_wait_s: float = PROBE_FIRST_WAIT_S,
        probe_max_wait_s: float = PROBE_MAX_WAIT_S,
    ) -> None:
        if not members:
            raise ValueError("an endpoint pool needs at least one endpoint")
        self.members = list(members)
        self.bucket = bucket
        self.outage_wait_s = outage_wait_s
        self.startup_wait_s = startup_wait_s
        self.clock = clock
        self.probe_first_wait_s = probe_first_wait_s
        self.probe_max_wait_s = probe_max_wait_s
        self.started = clock.monotonic()
        self.none_up_since: float | None = None
        self.moved = 0  # items sent to another member after an endpoint's failure
        self.last_refusal: Answer | None = None
        # Also told of each refusal's line: a cluster worker passes it on to the driver,
        # whose stderr the user reads (the worker's own log is not there).
        self.on_refused: Callable[[str], None] | None = None
        for member in self.members:
            member.probe_wait = probe_first_wait_s

    @property
    def appid(self) -> str:
        """Bodies are built for the first member's appid and re-headed for the others."""
        return self.members[0].client.appid

    @property
    def wants_body(self) -> bool:
        return True

    async def detect(self, payload: Payload) -> Answer:
        """Tag one item on some member; RunStopped only when no member is left."""
        attempts = 0
        while True:
            member = await self.choose()
            probe = member.probing  # set by choose() for this send alone: nothing awaited since
            answer = await self.send_to(member, payload, probe)
            attempts += answer.attempts
            if codes.stops_run(answer.code):
                self.refuse(member, answer)
            elif answer.endpoint_down:
                self.take_out(member, answer.message, probe)
            else:
                if answer.http_status is not None:  # the service answered: it is there
                    self.back_in(member)
                member.sent += 1
                answer.attempts = attempts
                answer.endpoint = member.name
                return answer
            self.moved += 1

    async def send_to(self, member: Member, payload: Payload, probe: bool = False) -> Answer:
        """The item's attempts on ``member``. Nothing is awaited between the choice and the
        member's limiter, so its queue count is right for the next choice."""
        body = with_appid(payload.body, self.appid, member.client.appid, self.bucket)
        sent = payload if body is payload.body else dataclasses.replace(payload, body=body)
        member.in_flight += 1
        try:
            return await member.client.attempt_item(sent)
        finally:
            member.in_flight -= 1
            if probe:
                member.probing = False

    async def choose(self) -> Member:
        """A member due for a probe, else the up member with the most headroom; waits
        while every member is out, and stops the run when none is left."""
        while True:
            now = self.clock.monotonic()
            live = [m for m in self.members if m.state is not State.REFUSED]
            if not live:
                raise self.all_refused()
            probe = next(
                (m for m in live if m.state is State.DOWN and not m.probing and now >= m.next_probe), None
            )
            if probe is not None:
                probe.probing = True
                return probe
            up = [m for m in live if m.state is State.UP]
            if up:
                return min(up, key=lambda m: (m.wait_before_start(now), m.load()))
            self.stop_if_gone_too_long(now, live)
            waits = [m.next_probe - now for m in live if not m.probing]
            await self.clock.sleep(max(0.0, min(waits)) if waits else IDLE_POLL_S)

    def take_out(self, member: Member, why: str, probe: bool = False) -> None:
        """The endpoint failed a request for its own reasons: out, probed with back-off.
        Only a failed probe backs off further: the requests that were in flight when it went
        away fail together and say nothing new."""
        now = self.clock.monotonic()
        member.last_error = why
        if member.state is State.UP:
            member.state = State.DOWN
            member.down_since = now
            log.warning("%s is not answering (%s): its items go to the other endpoints", member.name, why)
            member.next_probe = now + member.probe_wait
        elif member.state is State.DOWN and probe:
            member.probe_wait = min(member.probe_wait * 2, self.probe_max_wait_s)
            member.next_probe = now + member.probe_wait
        if self.none_up_since is None and not any(m.state is State.UP for m in self.members):
            self.none_up_since = now

    def back_in(self, member: Member) -> None:
        if member.state is State.DOWN:
            log.warning("%s answers again: back in", member.name)
        if member.state is not State.REFUSED:
            member.state = State.UP
        member.answered = True
        member.down_since = None
        member.probe_wait = self.probe_first_wait_s
        self.none_up_since = None

    def refuse(self, member: Member, answer: Answer) -> None:
        """Credentials refused: this endpoint is out for the run, said once."""
        if member.state is State.REFUSED:
            return
        member.state = State.REFUSED
        member.last_error = f"code {answer.code}: {answer.message}"
        left = sum(m.state is not State.REFUSED for m in self.members)
        line = (
            f"{member.name} refused the credentials ({member.last_error}); "
            f"{codes.describe(answer.code).fix}; going on with {left} other endpoint(s)"
        )
        log.warning("%s", line)
        if self.on_refused is not None:
            self.on_refused(line)
        self.last_refusal = answer

    def all_refused(self) -> CredentialsRefused:
        answer = self.last_refusal
        code = answer.code if answer is not None else codes.RUN_CREDENTIALS_REFUSED
        names = ", ".join(m.name for m in self.members)
        message = answer.message if answer is not None else "refused"
        return CredentialsRefused(code, f"{message}, by every endpoint ({names})")

    def stop_if_gone_too_long(self, now: float, live: list[Member]) -> None:
        """No member up: stop after outage-wait (startup wait when none ever answered)."""
        ever = any(m.answered for m in live)
        since = self.none_up_since if self.none_up_since is not None else self.started
        limit = self.outage_wait_s if ever else self.startup_wait_s
        if now - since < limit:
            return
        names = ", ".join(f"{m.name} ({m.last_error})" for m in live)
        if ever:
            raise EndpointUnreachable(
                f"no endpoint answered for {limit:g} s (outage-wait): {names}; "
                "finished records are in OUT: rerun to go on"
            )
        raise EndpointUnreachable(f"no endpoint answers: {names}: check the endpoints and the network")

    def counts(self) -> dict[str, int]:
        """Items each member answered, by name (the summary's per-endpoint line)."""
        return {m.name: m.sent for m in self.members}


@contextlib.asynccontextmanager
async def open_endpoint_pool(
    specs: Sequence[EndpointSpec],
    bucket: str,
    policy: RetryPolicy,
    concurrency: int,
    timeout_s: float,
    outage_wait_s: float,
    budget: RequestBudget | None = None,
    limiter_for: LimiterFor = own_limiter,
) -> AsyncIterator[EndpointPool]:
    """One session, limiter and client per endpoint, closed together; ``limiter_for`` gives
    each endpoint its limiter (a cluster worker's is its share of the endpoint's quota)."""
    async with contextlib.AsyncExitStack() as stack:
        members = []
        for spec in specs:
            client = await stack.enter_async_context(
                open_tag_client(
                    spec.url,
                    Credentials(spec.appid, spec.secret_id, spec.secret_key),
                    bucket,
                    limiter_for(spec.name, spec.qps),
                    policy,
                    concurrency,
                    timeout_s,
                    EndpointHealth(spec.name),
                    budget=budget,
                    hand_back=True,
                )
            )
            members.append(Member(spec.name, client, weight=spec.weight))
        yield EndpointPool(members, bucket, outage_wait_s=outage_wait_s)
