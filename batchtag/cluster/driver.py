"""The driver of a ``--cluster`` run: the pipeline's ``Run`` with its middle stage on Dask.

The producer (walk, skip what OUT holds, drop repeats) and writer (the one sink, the
summary, the bar) are the run's own; its middle stage (``ClusterStage``), instead of
preparers and senders, is one dispatcher that cuts the queue into chunks and submits them. At
most ``WINDOW_PER_THREAD`` chunks a worker thread are in flight, so the driver holds a
bounded number of items whatever the input size.

Faults: Dask reruns the chunk of a worker that died; every record is checked against
the keys already written, so a chunk that ran twice can never put a key in OUT twice. A
chunk that killed workers ``distributed.scheduler.allowed-failures`` times gets error
records (``--retry-errors`` tries it again). Losing the scheduler stops the run
(ClusterError, exit 2); what was written stays, so a rerun resumes.

``--max-requests N``: the driver holds what is left of N (``Grants``) and hands each chunk
one request an item (never more than is left); the chunk's worker gives back what it did
not spend. Items a grant did not reach (retries took it) come back unsent and go out again
with room for all their tries (``--retries`` + 1 each) while requests are left; once none
are left and no chunk holds any, the rest are passed over unsent, as in a plain run: a
clean stop, exit 5, a rerun goes on. So the workers together never send more than N,
whatever the chunks in flight; a chunk Dask runs twice gets its grant once (worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from distributed import Client, KilledWorker, LocalCluster
from distributed.client import FutureCancelledError
from distributed.security import Security

from batchtag import codes
from batchtag.cluster import ClusterAddress, ClusterError, SchedulerLost, parse_cluster_address
from batchtag.cluster.worker import (
    ChunkResult,
    TaggerPlugin,
    forget_claims,
    plugin_name,
    relay_slowdown,
    relay_workers,
    slowdown_topic,
    tag_chunk,
    warnings_topic,
)
from batchtag.config import CLUSTER_TLS_FIELDS, RunConfig
from batchtag.keyset import KeySet
from batchtag.pipeline.flow import Run
from batchtag.pipeline.progress import Progress, Summary
from batchtag.pipeline.resume import Checkpoint
from batchtag.pipeline.sources import Item
from batchtag.pipeline.stage import STOP, Ends, RecordSink
from batchtag.records import Record

log = logging.getLogger("batchtag")

CHUNK_ITEMS = 64  # ~1-2 s of one embedded worker: small loss when a worker dies, low task overhead
WINDOW_PER_THREAD = 2  # chunks in flight a worker thread: one running, one waiting
LOCAL_THREADS = 2  # chunks a local:N worker runs at once (one's tail overlaps the next)
WORKERS_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 1.0
CLOSE_TIMEOUT_S = 10.0
LOST_CLOSE_TIMEOUT_S = 1.0
RELAY_COOLDOWN_S = 1.0  # the limiter's own cooldown: one relayed slow-down a second at most

ChunkTask = Callable[[str, list[Item], int | None], ChunkResult]  # run id, items, grant


async def run_on_cluster(
    config: RunConfig,
    sink: RecordSink,
    checkpoint: Checkpoint,
    progress: Progress,
    task: ChunkTask = tag_chunk,
) -> Summary:
    """The run of ``run_batch`` with its items tagged on ``config.cluster``.

    ``task`` turns a chunk into records on a worker; the benchmark passes one that answers
    at once, to measure what one driver can take."""
    address = parse_cluster_address(config.cluster or "")
    run_id = uuid.uuid4().hex[:12]
    quiet_dask(config)
    async with connect(address, config) as client:
        threads = await wait_for_workers(client, address)
        async with tagger_on_every_worker(client, shipped_config(config), run_id, len(threads)):
            stage = ClusterStage(config, client, run_id, task, window_for(threads))
            return await Run(config, sink, checkpoint, progress, stage).execute()


def quiet_dask(config: RunConfig) -> None:
    """Dask logs worker deaths and reconnects at WARNING; the run reports what matters
    itself (one line on failure), so Dask speaks only with -v."""
    if not logging.getLogger("batchtag").isEnabledFor(logging.INFO):
        dask_loggers = [
            name for name in logging.root.manager.loggerDict if name.startswith(("distributed", "dask"))
        ]
        for name in ["distributed", "dask", *dask_loggers]:  # Dask gives some of them levels of their own
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def shipped_config(config: RunConfig) -> RunConfig:
    """The settings the workers get, through the scheduler: anyone who can talk to the
    scheduler can read them. The embedded endpoint needs no credentials, so they stay
    here; a remote endpoint needs them on every worker (README: More than one machine)."""
    if not config.is_local:
        return config
    return dataclasses.replace(config, appid="", secret_id="", secret_key="", secret_key_file="")


def security_for(config: RunConfig) -> Security | None:
    """Dask's TLS settings for a tls:// scheduler given certificate files; otherwise
    Dask's own configuration (``distributed.comm.tls``) applies."""
    if not any(getattr(config, name) for name in CLUSTER_TLS_FIELDS):
        return None
    return Security(
        tls_ca_file=config.cluster_tls_ca or None,
        tls_client_cert=config.cluster_tls_cert or None,
        tls_client_key=config.cluster_tls_key or None,
        require_encryption=True,
    )


async def connect_to_scheduler(address: ClusterAddress, config: RunConfig) -> Client:
    """The handshake, bounded as a whole: Dask's own connect timeout covers the TCP
    connection but not the first reply, so a port that speaks something else (HTTP)
    would hold the run forever."""
    timeout = config.cluster_connect_timeout
    client = Client(address.scheduler, asynchronous=True, timeout=timeout, security=security_for(config))
    try:
        return await asyncio.wait_for(asyncio.ensure_future(client), timeout)  # type: ignore[arg-type]
    except TimeoutError:
        await close_quietly(client.close(timeout=LOST_CLOSE_TIMEOUT_S), LOST_CLOSE_TIMEOUT_S)
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address}: no handshake within {timeout:g} s "
            "(--cluster-connect-timeout; is it a Dask scheduler, and tls:// if it uses TLS?)"
        ) from None
    except (OSError, ValueError) as exc:  # refused, TLS refused, bad certificate files
        await close_quietly(client.close(timeout=LOST_CLOSE_TIMEOUT_S), LOST_CLOSE_TIMEOUT_S)
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {one_line(exc)}") from None
    except TypeError:  # Dask's way of saying a tls:// address has no TLS settings
        await close_quietly(client.close(timeout=LOST_CLOSE_TIMEOUT_S), LOST_CLOSE_TIMEOUT_S)
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address}: tls:// needs --cluster-tls-ca and "
            "--cluster-tls-cert (or Dask's distributed.comm.tls settings)"
        ) from None


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.asynccontextmanager
async def connect(address: ClusterAddress, config: RunConfig) -> AsyncIterator[Client]:
    """A client of the scheduler; for local:N, a LocalCluster started here and stopped after."""
    cluster = None
    try:
        if address.local_workers:
            cluster = await LocalCluster(
                n_workers=address.local_workers,
                threads_per_worker=LOCAL_THREADS,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                # no dashboard; its bare HTTP server (health checks) on a free loopback port
                scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
                silence_logs=logging.CRITICAL,
                asynchronous=True,
            )
            client = await Client(cluster, asynchronous=True)
        else:
            client = await connect_to_scheduler(address, config)
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            await close_quietly(cluster.close())
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    timeout = CLOSE_TIMEOUT_S
    try:
        yield client
    except SchedulerLost:
        timeout = LOST_CLOSE_TIMEOUT_S  # nobody to say goodbye to
        raise
    finally:
        await close_quietly(client.close(timeout=timeout), timeout)
        if cluster is not None:
            await close_quietly(cluster.close(timeout=timeout), timeout)


async def close_quietly(closing: Any, timeout: float = CLOSE_TIMEOUT_S) -> None:
    """Closing after the scheduler went away can hang or raise; the run's result is set."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(closing, timeout)


async def wait_for_workers(client: Client, address: ClusterAddress) -> dict[str, int]:
    """The workers' thread counts, once there is at least one worker."""
    try:
        await client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
    except TimeoutError:
        raise ClusterError(
            f"no Dask worker joined {address} within {WORKERS_TIMEOUT_S:.0f} s (start some with: dask worker {address})"
        ) from None
    return await client.nthreads()


def window_for(threads: dict[str, int]) -> int:
    return max(2, WINDOW_PER_THREAD * sum(threads.values()))


@contextlib.asynccontextmanager
async def tagger_on_every_worker(
    client: Client, config: RunConfig, run_id: str, workers: int
) -> AsyncIterator[None]:
    """Each worker process sets up its client (and loads the embedded tagger) once for the
    run; torn down after it, so long-lived workers do not keep the model. Each paces every
    endpoint at its quota divided by ``workers``."""
    try:
        await client.register_plugin(TaggerPlugin(config, run_id, workers), name=plugin_name(run_id))
    except OSError:
        raise SchedulerLost(f"lost the Dask scheduler at {config.cluster} while the workers set up") from None
    except Exception as exc:
        raise ClusterError(f"a Dask worker could not set up batchtag: {type(exc).__name__}: {exc}") from None
    try:
        yield
    except SchedulerLost:
        raise
    except BaseException:
        await close_quietly(client.unregister_worker_plugin(plugin_name(run_id)))
        raise
    else:
        await close_quietly(client.unregister_worker_plugin(plugin_name(run_id)))


class Window:
    """At most ``limit`` chunks in flight; the limit follows the cluster's size."""

    def __init__(self, limit: int = 2) -> None:
        self.limit = limit
        self.in_flight = 0
        self._changed = asyncio.Condition()

    async def enter(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1

    async def leave(self) -> None:
        async with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    async def resize(self, limit: int) -> None:
        async with self._changed:
            self.limit = limit
            self._changed.notify_all()


class Grants:
    """``--max-requests`` over the cluster: what is left, handed out with the chunks and
    given back by them (see the module docstring). None: no limit."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit
        self.held = 0  # granted to chunks still out
        self._changed = asyncio.Condition()

    async def take(self, wanted: int) -> int | None:
        """``wanted`` requests or what is left, if less; waits while nothing is left but
        chunks out may give some back; 0 when the run's requests are spent."""
        if self.left is None:
            return None
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self.left) or self.held == 0)
            assert self.left is not None
            grant = min(self.left, wanted)
            self.left -= grant
            self.held += grant
            return grant

    async def give_back(self, grant: int | None, spent: int) -> None:
        if grant is None or self.left is None:
            return
        async with self._changed:
            self.held -= grant
            self.left += grant - min(spent, grant)
            self._changed.notify_all()


class ClusterStage:
    """Send through Dask: a ``stage.MiddleStage`` of one dispatcher task."""

    consumers = 1  # the producer's STOP goes to the one dispatcher
    queue_size = 2 * CHUNK_ITEMS  # a whole chunk can wait for a free slot

    def __init__(self, config: RunConfig, client: Client, run_id: str, task: ChunkTask, window: int) -> None:
        self.config = config
        self.dask = client
        self.run_id = run_id
        self.task = task
        self.window = Window(window)
        self.written = KeySet()  # keys sent to the writer by this run
        self.grants = Grants(config.max_requests)
        self._chunks = 0
        self._futures: set[Any] = set()  # submitted, not yet returned: cancelled if the run stops
        self._last_relay: dict[str, float] = {}  # by endpoint
        self._warned: set[str] = set()  # the workers' lines said once, not once a worker
        # The run's ends, given at start():
        self.queue: asyncio.Queue[Item | None]
        self.results: asyncio.Queue[Record | None]
        self.summary: Summary

    def start(self, ends: Ends) -> list[asyncio.Task[None]]:
        self.queue, self.results, self.summary = ends.items, ends.results, ends.summary
        # Every endpoint named in the summary, 0 for one that answered nothing, as a plain run's pool.
        self.summary.endpoints = {spec.name: 0 for spec in self.config.endpoint_specs}
        return [asyncio.create_task(self.dispatch(), name="dispatch")]

    async def dispatch(self) -> None:
        """Chunks out, records back, until the producer is done and every chunk is in."""
        self.dask.subscribe_topic(slowdown_topic(self.run_id), self.relay_slowdown)
        self.dask.subscribe_topic(warnings_topic(self.run_id), self.warn_once)
        watcher = asyncio.create_task(self.watch_workers(), name="watch-workers")
        try:
            async with asyncio.TaskGroup() as chunks:
                while True:
                    await self.window.enter()  # the queue fills meanwhile: full chunks when busy
                    chunk = await self.take_chunk()
                    if not chunk:
                        await self.window.leave()
                        break
                    chunks.create_task(self.run_chunk(chunk))
            await self.catch_up_warnings()
        except BaseExceptionGroup as group:
            raise first_cluster_error(group) from None
        finally:
            watcher.cancel()
            if self._futures:  # interrupted or failed: the cluster drops the rest of the work
                await close_quietly(self.dask.cancel(list(self._futures)))
            for topic in (slowdown_topic(self.run_id), warnings_topic(self.run_id)):
                with contextlib.suppress(Exception):
                    self.dask.unsubscribe_topic(topic)
            if self.config.max_requests:
                await close_quietly(self.dask.run_on_scheduler(forget_claims, self.run_id))

    async def take_chunk(self) -> list[Item]:
        """Up to CHUNK_ITEMS new items; fewer when a worker is free and the producer
        pauses (a slow walk must not leave workers idle); empty at the end."""
        chunk: list[Item] = []
        while len(chunk) < CHUNK_ITEMS:
            if chunk and self.queue.empty():
                break
            item = await self.queue.get()
            if item is STOP:
                self.queue.put_nowait(STOP)  # seen again by the next call: the end
                break
            chunk.append(item)
        return chunk

    async def run_chunk(self, items: list[Item]) -> None:
        """The chunk's records to the writer; under --max-requests, the items its grant did
        not reach go out again while requests are left, and are passed over after."""
        per_item = 1  # a first try each; retries that ran out of it get room for all tries again
        try:
            while items:
                grant = await self.grants.take(len(items) * per_item)
                if grant == 0:
                    self.summary.limit_reached = True  # not sent, no record: a rerun does them
                    return
                spent = grant or 0  # until the chunk says otherwise, all of it (a lost chunk)
                try:
                    result = await self.tag_remotely(items, grant)
                    spent = grant if result.rerun else result.spent
                    if result.rerun and grant:
                        log.info(
                            "a chunk ran again after a worker died: its grant of %d counts as spent", grant
                        )
                finally:
                    await self.grants.give_back(grant, spent)
                self.take(result)
                items = unsent(items, result) if result.limit_reached and spent else []
                per_item = 1 + self.config.retries
        finally:
            await self.window.leave()

    def take(self, result: ChunkResult) -> None:
        """Records of keys not written yet go to the writer (a rerun chunk's repeats do not)."""
        fresh = [record for record in result.records if self.written.add(record.key)]
        if len(fresh) < len(result.records):
            log.info("%d records of a rerun chunk were already written", len(result.records) - len(fresh))
        self.summary.workers[result.worker] += len(fresh)
        for record in fresh:
            endpoint = record.extra.get("endpoint")
            if endpoint is not None:
                self.summary.endpoints[endpoint] = self.summary.endpoints.get(endpoint, 0) + 1
            self.results.put_nowait(record)

    async def tag_remotely(self, items: list[Item], grant: int | None) -> ChunkResult:
        self._chunks += 1
        future = self.dask.submit(
            self.task, self.run_id, items, grant, key=f"batchtag-{self.run_id}-{self._chunks}", pure=False
        )
        self._futures.add(future)
        try:
            return await future
        except (FutureCancelledError, OSError):  # OSError: CommClosedError, the connection is gone
            raise SchedulerLost(
                f"lost the Dask scheduler at {self.config.cluster}; the records received so far are in "
                f"{self.config.out}, rerun to resume"
            ) from None
        except KilledWorker as exc:
            log.warning("%s", exc)
            return ChunkResult("(lost)", [worker_died_record(item) for item in items], rerun=True)
        except Exception as exc:
            raise ClusterError(f"a Dask worker failed a chunk: {type(exc).__name__}: {exc}") from None
        finally:
            self._futures.discard(future)

    async def watch_workers(self) -> None:
        """Follow the cluster's size: the window, and each worker's share of every quota."""
        workers = -1
        while True:
            try:
                threads = await self.dask.nthreads()
            except Exception:
                return  # the scheduler is gone: the chunks report it
            if len(threads) != workers and threads:
                workers = len(threads)
                await self.window.resize(window_for(threads))
                await self.broadcast(relay_workers, self.run_id, workers)
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def relay_slowdown(self, event: Any) -> None:
        """A worker was rate-limited (code 15) by an endpoint: its quota is the whole
        cluster's, so every worker slows down for that endpoint, not just the one told."""
        _, message = event
        endpoint = str(message.get("endpoint", "")) if isinstance(message, dict) else ""
        now = time.monotonic()
        if now - self._last_relay.get(endpoint, -1e9) < RELAY_COOLDOWN_S:
            return
        self._last_relay[endpoint] = now
        log.info("rate-limited by %s on a worker: every worker slows down for it", endpoint or "the endpoint")
        await self.broadcast(relay_slowdown, self.run_id, endpoint)

    async def catch_up_warnings(self) -> None:
        """Lines still on their way when the last chunk is in: the scheduler keeps them (a
        worker's event goes to it before the result of the chunk that raised it)."""
        with contextlib.suppress(Exception):
            for event in await self.dask.get_events(warnings_topic(self.run_id)):
                self.warn_once(event)

    def warn_once(self, event: Any) -> None:
        """A worker's line for the user (an endpoint refused the credentials): each worker's
        pool finds it out, the user reads it once. Lines name endpoints, never secrets."""
        _, message = event
        line = str(message.get("line", "")) if isinstance(message, dict) else ""
        if line and line not in self._warned:
            self._warned.add(line)
            log.warning("%s", line)

    async def broadcast(self, function: Any, *args: Any) -> None:
        with contextlib.suppress(Exception):
            await self.dask.run(function, *args, wait=False)


def unsent(items: list[Item], result: ChunkResult) -> list[Item]:
    """The chunk's items its grant did not reach: no record came back for them."""
    answered = {record.key for record in result.records}
    return [item for item in items if item.key not in answered]


def worker_died_record(item: Item) -> Record:
    return Record(
        item.key,
        item.kind,
        "error",
        codes.CLIENT_INTERNAL_ERROR,
        "Dask workers died running this item's chunk; rerun with --retry-errors",
        [],
        0,
    )


def first_cluster_error(group: BaseExceptionGroup) -> BaseException:
    """TaskGroup wraps a chunk's failure; the run reports the first one, as itself."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_cluster_error(exc)
        if isinstance(exc, ClusterError):
            return exc
    return group.exceptions[0]
