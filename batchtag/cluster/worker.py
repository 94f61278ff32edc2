"""What runs inside each Dask worker process.

A worker plugin sets up one ``WorkerRuntime`` a process for the run: an event loop in a
thread of its own, holding the run's HTTP client and, with the embedded endpoint, the
tagger's server, so the model loads once a process and not once a chunk. ``tag_chunk``,
the task the driver submits, hands its items to that loop, where the pipeline's own
preparers and senders (``ChunkRun``) turn them into records. Tagging never runs on the
Dask worker's own loop, so heartbeats keep flowing while a chunk is busy.

Rate: each worker paces its requests at its share of the run's ``--qps`` (set by the
driver, rebalanced when workers come or go). A code-15 answer slows this worker down at
once and is announced to the driver, which relays it to every worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from batchtag.config import RunConfig
from batchtag.pipeline.client import TagClient
from batchtag.pipeline.flow import Run
from batchtag.pipeline.local import LocalStage, open_client
from batchtag.pipeline.progress import Progress
from batchtag.pipeline.ratelimit import AdaptiveRateLimiter
from batchtag.pipeline.resume import Checkpoint
from batchtag.pipeline.sources import Item
from batchtag.pipeline.stage import STOP
from batchtag.records import Record

STOP_TIMEOUT_S = 30.0


def plugin_name(run_id: str) -> str:
    return f"batchtag-{run_id}"


def slowdown_topic(run_id: str) -> str:
    return f"batchtag-{run_id}-slowdown"


class ChunkResult(NamedTuple):
    worker: str  # the Dask worker's name, for the per-worker counts
    records: list[Record]


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
    """One a worker process and run: the loop thread, the client, the limiter."""

    def __init__(self, config: RunConfig, share: float | None, announce: Callable[[], None]) -> None:
        self.config = config
        self.limiter = ClusterLimiter(share, announce)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="batchtag-worker", daemon=True)
        self._resources = contextlib.AsyncExitStack()
        self._client: TagClient | None = None

    def start(self) -> concurrent.futures.Future[None]:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._open(), self.loop)

    async def _open(self) -> None:
        self._client = await self._resources.enter_async_context(open_client(self.config, self.limiter))

    def tag(self, items: list[Item]) -> list[Record]:
        """Blocks the calling (Dask task) thread until the chunk is done."""
        return asyncio.run_coroutine_threadsafe(self._tag(items), self.loop).result()

    async def _tag(self, items: list[Item]) -> list[Record]:
        assert self._client is not None, "the runtime is started before its first chunk"
        run = ChunkRun(self.config, self._client, items)
        summary = await run.execute()
        if summary.interrupted:
            raise ChunkInterrupted("the worker stopped before its chunk was done")
        return run.collected.records

    def slow_down(self) -> None:
        self.loop.call_soon_threadsafe(self.limiter.on_peer_rate_limited)

    def set_share(self, share: float) -> None:
        self.loop.call_soon_threadsafe(self.limiter.set_share, share)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        closing = asyncio.run_coroutine_threadsafe(self._resources.aclose(), self.loop)
        with contextlib.suppress(Exception):
            closing.result(timeout=STOP_TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=STOP_TIMEOUT_S)


class TaggerPlugin(WorkerPlugin):
    """Registered by the driver for one run: every worker (also one that joins later or
    restarts) sets up its runtime before it runs the run's chunks."""

    def __init__(self, config: RunConfig, run_id: str, share: float | None) -> None:
        self.config = config
        self.run_id = run_id
        self.share = share
        self.runtime: WorkerRuntime | None = None

    async def setup(self, worker: Any) -> None:
        topic, name = slowdown_topic(self.run_id), str(worker.name)
        self.runtime = WorkerRuntime(
            self.config, self.share, lambda: worker.log_event(topic, {"worker": name})
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


def tag_chunk(run_id: str, items: list[Item]) -> ChunkResult:
    """The Dask task: one chunk of items to their records, in this worker's runtime."""
    worker = get_worker()
    return ChunkResult(str(worker.name), runtime_of(run_id, worker).tag(items))


async def relay_slowdown(run_id: str, dask_worker: Any) -> None:
    """Run on every worker (``Client.run``) when one of them was rate-limited."""
    runtime_of(run_id, dask_worker).slow_down()


async def relay_share(run_id: str, share: float, dask_worker: Any) -> None:
    """Run on every worker when the number of workers changed."""
    runtime_of(run_id, dask_worker).set_share(share)
