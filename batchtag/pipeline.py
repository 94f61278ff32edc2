"""Pipeline wiring: source -> bounded queue -> workers -> sink, and the Python API.

    producer (sources, dedupe against OUT)  --queue-->  preparers (read, check, encode)
        --ready-->  N senders (client: pace, sign, POST, retry)  --results-->  one writer (sink)

The queue is bounded, so memory stays flat however large the input; only the writer
touches OUT. ``run_batch`` is the async entry point, ``run`` its sync wrapper; the CLI
is a thin layer over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import numpy as np

from batchtag import codes, signing
from batchtag.client import Answer, RetryPolicy, TagClient
from batchtag.config import RunConfig
from batchtag.keyset import KeySet, fingerprint
from batchtag.payload import InputError, Payload, build_payload
from batchtag.progress import Progress, Summary
from batchtag.ratelimit import AdaptiveRateLimiter
from batchtag.records import Record
from batchtag.sink import Checkpoint, ResultSink, open_sink
from batchtag.sources import Item, check_source, iter_items

log = logging.getLogger("batchtag")

CHUNK = 2048  # items pulled from the (blocking) source walker per thread hop
STOP = None


def take(iterator: Iterator[Item], n: int) -> list[Item]:
    return list(itertools.islice(iterator, n))


class Run:
    """One run's state; built and driven by ``run_batch``."""

    def __init__(
        self,
        config: RunConfig,
        sink: ResultSink,
        checkpoint: Checkpoint,
        client: TagClient,
        progress: Progress,
    ) -> None:
        self.config = config
        self.sink = sink
        self.checkpoint = checkpoint
        self.client = client
        self.progress = progress
        self.summary = Summary(out=config.out)
        self.queue: asyncio.Queue[Item | None] = asyncio.Queue(maxsize=config.concurrency * 4)
        # A few preparers keep a small buffer of encoded payloads ahead of the senders; small,
        # because a payload can be 13 MB of base64.
        self.preparers = max(1, min(8, config.concurrency // 4))
        self._preparers_left = self.preparers
        self.ready: asyncio.Queue[tuple[Item, Payload] | None] = asyncio.Queue(maxsize=self.preparers * 2)
        self.results: asyncio.Queue[Record | None] = asyncio.Queue()
        self.seen = KeySet()
        self._walker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchtag-source")

    def warn(self, message: str) -> None:
        self.summary.warnings += 1
        log.warning("%s", message)

    # -- producer ---------------------------------------------------------------------------

    async def produce(self) -> None:
        loop = asyncio.get_running_loop()
        iterator = iter_items(self.config.sources, warn=lambda m: loop.call_soon_threadsafe(self.warn, m))
        while (chunk := await loop.run_in_executor(self._walker, self.next_new_items, iterator)) is not None:
            for item in chunk:
                await self.queue.put(item)
        # Only a finished producer stops the workers; a failed or cancelled one takes the
        # whole run down through execute(), so nothing waits on a full queue.
        for _ in range(self.preparers):
            await self.queue.put(STOP)

    def next_new_items(self, iterator: Iterator[Item]) -> list[Item] | None:
        """The next chunk's items that OUT does not hold and the sources did not repeat;
        None at the end. Runs in the walker thread, so skipping a million finished items
        never occupies the event loop."""
        chunk = take(iterator, CHUNK)
        if not chunk:
            return None
        fingerprints = np.fromiter(
            (fingerprint(item.key) for item in chunk), dtype=np.uint64, count=len(chunk)
        )
        done = self.checkpoint.done.contains_many(fingerprints)
        if done.any():
            self.summary.skipped_done += int(done.sum())
            self.summary.previous_errors += int(
                self.checkpoint.errors.contains_many(fingerprints[done]).sum()
            )
        fresh = []
        for item, fp, is_done in zip(chunk, fingerprints.tolist(), done.tolist(), strict=True):
            if is_done:
                continue
            if self.seen.add_fingerprint(fp):
                fresh.append(item)
            else:
                self.summary.duplicates += 1
        return fresh

    # -- workers: prepare (read, check, encode), then send ------------------------------------

    async def prepare(self) -> None:
        """Read and encode ahead of the senders, so a sender never waits on the disk
        between two requests (a worker that did both idled for each file read)."""
        while (item := await self.queue.get()) is not STOP:
            ready = await self.build(item)
            if isinstance(ready, Record):
                await self.results.put(ready)
            else:
                await self.ready.put(ready)
        self._preparers_left -= 1
        if self._preparers_left == 0:
            for _ in range(self.config.concurrency):
                await self.ready.put(STOP)

    async def build(self, item: Item) -> Record | tuple[Item, Payload]:
        if item.error_code is not None:
            return error_record(item, item.error_code, item.error or codes.message(item.error_code))
        try:
            payload = await build_payload(
                item, self.client.appid, self.config.bucket, self.config.max_image_bytes
            )
        except InputError as exc:
            return error_record(item, exc.code, str(exc))
        except Exception as exc:  # a bug must cost one item, not the run
            return internal_error(item, exc)
        return item, payload

    async def send(self) -> None:
        while (ready := await self.ready.get()) is not STOP:
            item, payload = ready
            started = time.monotonic()
            try:
                answer = await self.client.detect(payload.body)
            except Exception as exc:  # a bug must cost one item, not the run
                await self.results.put(internal_error(item, exc))
                continue
            await self.results.put(result_record(item, payload, answer, started))

    # -- writer -----------------------------------------------------------------------------

    async def write(self) -> None:
        """Write records as they come, in batches: whatever is queued goes in one write."""
        finished = False
        while not finished:
            batch = [await self.results.get()]
            while not self.results.empty() and len(batch) < 1024:
                batch.append(self.results.get_nowait())
            if STOP in batch:
                finished = True
                batch = [r for r in batch if r is not STOP]
            await self.sink.write(batch)  # type: ignore[arg-type]
            for record in batch:
                self.summary.count(record)  # type: ignore[arg-type]
            self.progress.advance(self.summary, len(batch))

    # -- the whole run ----------------------------------------------------------------------

    async def execute(self) -> Summary:
        started = time.monotonic()
        tasks = [asyncio.create_task(self.produce(), name="producer")]
        tasks += [asyncio.create_task(self.prepare(), name=f"prepare-{i}") for i in range(self.preparers)]
        tasks += [asyncio.create_task(self.send(), name=f"send-{i}") for i in range(self.config.concurrency)]
        writer = asyncio.create_task(self.write(), name="writer")
        writer.add_done_callback(lambda t: _cancel_on_failure(t, tasks))
        counter = self.start_counting()
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            self.summary.interrupted = True
        finally:
            for task in [*tasks, *([counter] if counter else [])]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.results.put_nowait(STOP)
            await writer  # drains every finished record; raises SinkError if OUT failed
            self._walker.shutdown(wait=False, cancel_futures=True)
            self.summary.wall_s = time.monotonic() - started
        return self.summary

    def start_counting(self) -> asyncio.Task[None] | None:
        """Count the items still to do in the background, for the bar's ETA."""
        if not self.progress.enabled or "-" in self.config.sources:
            return None

        def count() -> int:
            done = self.checkpoint.done
            return sum(1 for item in iter_items(self.config.sources) if item.key not in done)

        async def count_then_set() -> None:
            total = await asyncio.to_thread(count)
            self.progress.set_total(total)

        return asyncio.create_task(count_then_set())


def _cancel_on_failure(writer: asyncio.Task[None], tasks: list[asyncio.Task[None]]) -> None:
    if not writer.cancelled() and writer.exception() is not None:
        for task in tasks:
            task.cancel()


def result_record(item: Item, payload: Payload, answer: Answer, started: float) -> Record:
    extra = {**payload.notes, "elapsed_ms": round((time.monotonic() - started) * 1000)}
    status = "ok" if answer.ok else "error"
    return Record(
        item.key, item.kind, status, answer.code, answer.message, answer.tags, answer.attempts, extra
    )


def internal_error(item: Item, exc: Exception) -> Record:
    log.error("internal error on %s", item.key, exc_info=exc)
    return error_record(item, codes.CLIENT_INTERNAL_ERROR, f"internal error: {type(exc).__name__}")


def error_record(item: Item, code: int, message: str) -> Record:
    return Record(item.key, item.kind, "error", code, message, [], 0)


@contextlib.asynccontextmanager
async def api_endpoint(config: RunConfig) -> AsyncIterator[tuple[str, signing.Credentials]]:
    """The endpoint and credentials to use: the configured service, or the embedded
    tagger started on a free loopback port with throwaway credentials."""
    if not config.is_local:
        yield config.endpoint, signing.Credentials(config.appid, config.secret_id, config.secret_key)
        return
    from batchtag.server import ServeConfig, start_server, throwaway_credentials

    credentials = throwaway_credentials()
    server = await start_server(
        ServeConfig(
            host="127.0.0.1", port=0, tagger=config.tagger, lang=config.lang, credentials=[credentials]
        )
    )
    try:
        yield server.url, credentials
    finally:
        await server.close()


async def run_batch(config: RunConfig, progress: bool | None = None) -> Summary:
    """Tag every item of ``config.sources`` into ``config.out``; resumable, see sink.py.

    Raises SourceError or ConfigError for unusable settings and SinkError when OUT cannot
    be written. Interrupting the task (cancel) flushes finished records, then returns a
    summary with ``interrupted`` set.
    """
    started = time.monotonic()
    config.validate()
    for source in config.sources:
        check_source(source)
    sink, checkpoint = open_sink(config.out, retry_errors=config.retry_errors)
    bar = Progress(config.progress if progress is None else progress)
    try:
        async with api_endpoint(config) as (endpoint, credentials):
            connector = aiohttp.TCPConnector(limit=config.concurrency, limit_per_host=config.concurrency)
            timeout = aiohttp.ClientTimeout(total=config.timeout)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                client = TagClient(
                    session,
                    endpoint,
                    credentials,
                    config.bucket,
                    AdaptiveRateLimiter(config.qps),
                    RetryPolicy(retries=config.retries),
                )
                summary = await Run(config, sink, checkpoint, client, bar).execute()
    finally:
        bar.close()
        await sink.close()
    summary.wall_s = time.monotonic() - started  # start-up (model load, resume scan) included
    if config.summary_json:
        summary.write_json(config.summary_json)
    return summary


def run(config: RunConfig, progress: bool | None = None) -> Summary:
    """Synchronous wrapper of ``run_batch`` for scripts and notebooks without a loop."""
    return asyncio.run(run_batch(config, progress))
