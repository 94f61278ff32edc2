"""What runs inside each Dask worker process.

A worker plugin sets up one ``WorkerRuntime`` a process for the run: an event loop in a
thread of its own, holding the run's HTTP client and, with the embedded endpoint, the
tagger's server, so the model loads once a process and not once a chunk. ``tag_chunk``,
the task the driver submits, hands its items to that loop, where the pipeline's own
preparers and senders (``ChunkRun``) turn them into records. Tagging never runs on the
Dask worker's own loop, so heartbeats keep flowing while a chunk is busy.

Rate: each worker paces its requests to each endpoint at its share of that endpoint's
quota (``--qps``, or an ``[[endpoints]]`` entry's ``qps``, divided by the number of
workers, rebalanced when workers come or go); with several endpoints the worker's client is
an ``EndpointPool`` of those shares, failing over as in a plain run. A code-15 answer slows
this worker's limiter of that endpoint at once and is announced to the driver, which
relays it to every worker's limiter of the same endpoint.

Budget: with ``--max-requests`` each chunk comes with a grant from the driver (never more
than the run has left); the chunk's requests spend it, and what it did not spend goes back
with its records. The process's one client serves every chunk running at once, so the
grant is found through a context variable set in the chunk's task (its senders are
created inside it). A chunk Dask runs again after a worker died gets no grant: its first
run may have spent it (the driver counts it spent), and its items come back unsent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from distributed import get_client, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from batchtag.config import RunConfig
from batchtag.pipeline.budget import RequestBudget, RequestLimitReached
from batchtag.pipeline.client import TagClient
from batchtag.pipeline.endpoints import EndpointPool
from batchtag.pipeline.flow import Run
from batchtag.pipeline.local import LocalStage, open_client
from batchtag.pipeline.progress import Progress
from batchtag.pipeline.ratelimit import AdaptiveRateLimiter
from batchtag.pipeline.resume import Checkpoint
from batchtag.pipeline.sources import Item
from batchtag.pipeline.stage import STOP
from batchtag.records import Record

STOP_TIMEOUT_S = 30.0
CLAIMS_ATTRIBUTE = "batchtag_grants_claimed"


def plugin_name(run_id: str) -> str:
    return f"batchtag-{run_id}"


def slowdown_topic(run_id: str) -> str:
    return f"batchtag-{run_id}-slowdown"


def warnings_topic(run_id: str) -> str:
    return f"batchtag-{run_id}-warnings"


class ChunkResult(NamedTuple):
    worker: str  # the Dask worker's name, for the per-worker counts
    records: list[Record]
    spent: int = 0  # requests of its --max-requests grant it sent
    limit_reached: bool = False  # the grant ran out: items without a record were not sent
    rerun: bool = False  # Dask ran it again (a worker died): its first run may have spent the grant


class ChunkDone(NamedTuple):
    """What a chunk's run on this worker gives back: records, and its grant's use."""

    records: list[Record]
    spent: int
    limit_reached: bool


CHUNK_GRANT: contextvars.ContextVar[RequestBudget | None] = contextvars.ContextVar(
    "batchtag_chunk_grant", default=None
)


class ChunkBudget(RequestBudget):
    """The budget of the worker's shared client: each request spends the grant of the chunk
    it belongs to (``CHUNK_GRANT``, set in the chunk's task). A request outside any chunk
    has no grant and is refused: the run's total can never pass ``--max-requests``."""

    def __init__(self) -> None:
        super().__init__(None)

    @property
    def exhausted(self) -> bool:
        grant = CHUNK_GRANT.get()
        return grant is None or grant.exhausted

    def spend(self) -> None:
        grant = CHUNK_GRANT.get()
        if grant is None:
            raise RequestLimitReached(0)
        grant.spend()


class ChunkInterrupted(RuntimeError):
    """The worker's runtime stopped mid-chunk: the chunk must not count as done."""


class ClusterLimiter(AdaptiveRateLimiter):
    """This worker's share of the run's rate. Its own rate-limit answers are announced
    (once a cooldown, like the decrease itself), so the driver can slow every worker."""

    def __init__(self, share: float | None, announce: Callable[[], None]) -> None:
        super().__init__(share)
        self._announce = announce

    def on_rate_limited(self) -> None:
        before = self.decreases
        super().on_rate_limited()
        if self.decreases > before:
            self._announce()

    def on_peer_rate_limited(self) -> None:
        """Another worker was told to slow down: the quota is shared, so slow down too."""
        super().on_rate_limited()

    def set_share(self, share: float) -> None:
        """A new share of ``--qps`` (workers came or went); AIMD state scales with it."""
        if self.max_rate is None or share <= 0:
            return
        factor = share / self.max_rate
        self.max_rate = share
        if self.rate is not None:
            self.rate = min(share, self.rate * factor)
        if self._ceiling is not None:
            self._ceiling *= factor


class RecordList:
    """The sink of a chunk: records stay in memory and go back to the driver. Offsets are
    list positions, so copies of identical bytes within a chunk are still sent once."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    async def write(self, records: list[Record]) -> list[int]:
        start = len(self.records)
        self.records.extend(records)
        return list(range(start, len(self.records)))

    def read_record_at(self, offset: int) -> Record | None:
        return self.records[offset] if 0 <= offset < len(self.records) else None


class ChunkRun(Run):
    """The pipeline's run over one chunk: the producer is the chunk itself, the middle stage
    the local one (prepare and send in this process), the sink a ``RecordList``."""

    def __init__(self, config: RunConfig, client: TagClient, items: list[Item]) -> None:
        self.collected = RecordList()
        super().__init__(config, self.collected, Checkpoint(), Progress(False), LocalStage(config, client))
        self.items = items

    async def produce(self) -> None:
        for item in self.items:
            await self.queue.put(item)
        for _ in range(self.middle.consumers):
            await self.queue.put(STOP)


class WorkerRuntime:
    """One a worker process and run: the loop thread, the client, a limiter an endpoint."""

    def __init__(
        self,
        config: RunConfig,
        workers: int,
        announce: Callable[[str], None],
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.workers = max(1, workers)
        self._announce = announce  # a code 15 from this endpoint
        self._warn = warn  # a line for the driver's stderr (an endpoint refused the credentials)
        self.limiters: dict[str, ClusterLimiter] = {}  # by endpoint name
        self.quotas: dict[str, float | None] = {}  # each endpoint's whole quota, split over the workers
        self.budget = ChunkBudget() if config.max_requests else None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="batchtag-worker", daemon=True)
        self._resources = contextlib.AsyncExitStack()
        self._client: TagClient | None = None

    def start(self) -> concurrent.futures.Future[None]:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._open(), self.loop)

    async def _open(self) -> None:
        client = open_client(self.config, self.limiter_for, self.budget)
        self._client = await self._resources.enter_async_context(client)
        if isinstance(self._client, EndpointPool):
            self._client.on_refused = self._warn

    def limiter_for(self, name: str, qps: float | None) -> ClusterLimiter:
        """The endpoint's quota split evenly over the workers, for one endpoint or several alike."""
        limiter = ClusterLimiter(share_of(qps, self.workers), lambda: self._announce(name))
        self.limiters[name], self.quotas[name] = limiter, qps
        return limiter

    def tag(self, items: list[Item], grant: int | None) -> ChunkDone:
        """Blocks the calling (Dask task) thread until the chunk is done."""
        return asyncio.run_coroutine_threadsafe(self._tag(items, grant), self.loop).result()

    async def _tag(self, items: list[Item], grant: int | None) -> ChunkDone:
        assert self._client is not None, "the runtime is started before its first chunk"
        budget = RequestBudget(grant) if grant is not None else None
        CHUNK_GRANT.set(budget)  # this task's context: the chunk's senders inherit it
        run = ChunkRun(self.config, self._client, items)
        summary = await run.execute()
        if summary.interrupted:
            raise ChunkInterrupted("the worker stopped before its chunk was done")
        spent = budget.spent if budget is not None else 0
        return ChunkDone(run.collected.records, spent, summary.limit_reached)

    def slow_down(self, endpoint: str) -> None:
        limiter = self.limiters.get(endpoint)
        if limiter is not None:
            self.loop.call_soon_threadsafe(limiter.on_peer_rate_limited)

    def set_workers(self, workers: int) -> None:
        self.loop.call_soon_threadsafe(self._set_workers, max(1, workers))

    def _set_workers(self, workers: int) -> None:
        self.workers = workers
        for name, limiter in self.limiters.items():
            share = share_of(self.quotas[name], workers)
            if share is not None:
                limiter.set_share(share)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        closing = asyncio.run_coroutine_threadsafe(self._resources.aclose(), self.loop)
        with contextlib.suppress(Exception):
            closing.result(timeout=STOP_TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=STOP_TIMEOUT_S)


def share_of(qps: float | None, workers: int) -> float | None:
    """A worker's share of a quota: the cluster as a whole keeps to it."""
    return qps / workers if qps else None


class TaggerPlugin(WorkerPlugin):
    """Registered by the driver for one run: every worker (also one that joins later or
    restarts) sets up its runtime before it runs the run's chunks. ``workers`` is the
    cluster's size when the run starts (the driver sends the new one when it changes)."""

    def __init__(self, config: RunConfig, run_id: str, workers: int) -> None:
        self.config = config
        self.run_id = run_id
        self.workers = workers
        self.runtime: WorkerRuntime | None = None

    async def setup(self, worker: Any) -> None:
        topic, name = slowdown_topic(self.run_id), str(worker.name)
        self.runtime = WorkerRuntime(
            self.config,
            self.workers,
            lambda endpoint: worker.log_event(topic, {"worker": name, "endpoint": endpoint}),
            lambda line: worker.log_event(warnings_topic(self.run_id), {"worker": name, "line": line}),
        )
        await asyncio.wrap_future(self.runtime.start())

    async def teardown(self, worker: Any) -> None:
        if self.runtime is not None:
            await asyncio.to_thread(self.runtime.stop)
            self.runtime = None


def runtime_of(run_id: str, worker: Any) -> WorkerRuntime:
    plugin = worker.plugins.get(plugin_name(run_id))
    if plugin is None or plugin.runtime is None:
        raise RuntimeError(f"batchtag is not set up on worker {worker.name}")
    return plugin.runtime


def tag_chunk(run_id: str, items: list[Item], grant: int | None = None) -> ChunkResult:
    """The Dask task: one chunk of items to their records, in this worker's runtime, within
    its ``grant`` of ``--max-requests`` (None: no limit)."""
    worker = get_worker()
    rerun = grant is not None and not claim_grant(run_id, worker.get_current_task())
    done = runtime_of(run_id, worker).tag(items, 0 if rerun else grant)
    return ChunkResult(str(worker.name), done.records, done.spent, done.limit_reached, rerun)


def claim_grant(run_id: str, key: str) -> bool:
    """Whether this is the task's first run. Dask runs a task again when its worker died
    while running it, or after it finished but before the driver had its result; either
    first run may have spent the grant, so only the first to claim it on the scheduler (one
    event loop: one claim at a time) gets it (asked only under --max-requests)."""
    return bool(get_client().run_on_scheduler(claim_on_scheduler, run_id, key))


def claim_on_scheduler(run_id: str, key: str, dask_scheduler: Any) -> bool:
    claimed = grants_claimed(dask_scheduler).setdefault(run_id, set())
    first = key not in claimed
    claimed.add(key)
    return first


def forget_claims(run_id: str, dask_scheduler: Any) -> None:
    """On the scheduler, when the run ends: its claims are no longer needed."""
    grants_claimed(dask_scheduler).pop(run_id, None)


def grants_claimed(scheduler: Any) -> dict[str, set[str]]:
    """The task keys that claimed their grant, by run: kept on the scheduler object."""
    if not hasattr(scheduler, CLAIMS_ATTRIBUTE):
        setattr(scheduler, CLAIMS_ATTRIBUTE, {})
    return getattr(scheduler, CLAIMS_ATTRIBUTE)


async def relay_slowdown(run_id: str, endpoint: str, dask_worker: Any) -> None:
    """Run on every worker (``Client.run``) when one of them was rate-limited by ``endpoint``."""
    runtime_of(run_id, dask_worker).slow_down(endpoint)


async def relay_workers(run_id: str, workers: int, dask_worker: Any) -> None:
    """Run on every worker when the number of workers changed: new shares of every quota."""
    runtime_of(run_id, dask_worker).set_workers(workers)
