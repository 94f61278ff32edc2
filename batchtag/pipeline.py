"""Pipeline wiring: which stage runs where, the queues between them, and how the run stops.

    producer (sources, resume filter)  --queue-->  preparers (payload: read, check, encode)
        --ready-->  N senders (client: pace, sign, POST, retry)  --results-->  one writer (sink)

Each stage's work lives in its own module (sources, resume, payload, client, records,
sink); this one only connects them. The queues are bounded, so memory stays flat however
large the input; only the writer touches OUT. ``run_batch`` is the async entry point,
``run`` its sync wrapper; the CLI is a thin layer over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

from batchtag import codes, records
from batchtag.client import EndpointHealth, RetryPolicy, TagClient, embedded_client, open_tag_client
from batchtag.config import RunConfig, is_plain_http_to_another_host, public_url
from batchtag.dedupe import FOLLOW, Dedupe
from batchtag.errors import ConfigError, InputError, RunStopped
from batchtag.excludes import WalkRules
from batchtag.payload import (
    READ_BATCH_BYTES,
    READ_BATCH_FILES,
    FileRead,
    Payload,
    build_payload,
    image_payload,
    read_images,
)
from batchtag.progress import Progress, Summary, check_summary_path
from batchtag.ratelimit import AdaptiveRateLimiter
from batchtag.records import Record, Settings
from batchtag.resume import Checkpoint, ResumeFilter, Skipped
from batchtag.signing import Credentials
from batchtag.sink import ResultSink, Writer, open_sink, refuse_out_among_sources
from batchtag.sources import Item, Walk, check_source, iter_items

log = logging.getLogger("batchtag")

CHUNK = 2048  # items pulled from the (blocking) source walker per thread hop
WRITE_WINDOW_S = 0.05  # records finished within this time share one write
WRITE_BATCH = 1024  # records a write at most
WARNINGS_SHOWN = 5  # then only a count, at the end
STOP = None


class Run:
    """One run's tasks and queues; built and driven by ``run_batch``."""

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
        self.resume = ResumeFilter(checkpoint)
        self.settings = config.settings()
        rules = WalkRules(tuple(config.exclude), config.include_hidden)
        self.walk = Walk(rules=rules, left_out=self.summary.left_out)
        self.dedupe = Dedupe(checkpoint.content, sink.read_record_at)
        self._walker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchtag-source")

    def warn(self, message: str) -> None:
        self.summary.warnings += 1
        if self.summary.warnings <= WARNINGS_SHOWN:
            log.warning("%s", message)

    def report_hidden_warnings(self) -> None:
        hidden = self.summary.warnings - WARNINGS_SHOWN
        if hidden > 0:
            log.warning("%d more warnings like these not shown", hidden)

    # -- producer: the one walk of the sources ------------------------------------------------

    async def produce(self) -> None:
        loop = asyncio.get_running_loop()
        self.walk.warn = lambda m: loop.call_soon_threadsafe(self.warn, m)
        iterator = iter_items(self.config.sources, walk=self.walk)
        found = 0
        while (chunk := await loop.run_in_executor(self._walker, self.next_chunk, iterator)) is not None:
            fresh, skipped = chunk
            self.summary.skip(skipped)
            self.summary.found += len(fresh)
            found += len(fresh)
            for item in fresh:
                await self.queue.put(item)
        self.progress.set_total(found)  # counted by the walk itself: there is no second walk
        # Only a finished producer stops the workers; a failed or cancelled one takes the
        # whole run down through execute(), so nothing waits on a full queue.
        for _ in range(self.preparers):
            await self.queue.put(STOP)

    def next_chunk(self, iterator: Iterator[Item]) -> tuple[list[Item], Skipped] | None:
        """The next chunk's items still to do (walker thread); None at the end."""
        chunk = list(itertools.islice(iterator, CHUNK))
        return self.resume.new_items(chunk) if chunk else None

    # -- workers: prepare (read, check, encode), then send ------------------------------------

    async def prepare(self) -> None:
        """Read and encode ahead of the senders, so a sender never waits on the disk
        between two requests (a worker that did both idled for each file read)."""
        stopped = False
        while not stopped:
            items, stopped = await self.next_items()
            for item, read in zip(items, await self.read_files(items), strict=True):
                ready = await self.build(item, read)
                if isinstance(ready, Record):
                    await self.results.put(ready)
                elif ready is not None:
                    await self.ready.put(ready)
        self._preparers_left -= 1
        if self._preparers_left == 0:
            for _ in range(self.config.concurrency):
                await self.ready.put(STOP)

    async def next_items(self) -> tuple[list[Item], bool]:
        """The next item, and the ones queued behind it up to a read batch (so files are
        read several to a thread hop); True once this preparer's STOP was taken."""
        item = await self.queue.get()
        if item is STOP:
            return [], True
        items, size = [item], item.size or 0
        while len(items) < READ_BATCH_FILES and size < READ_BATCH_BYTES and not self.queue.empty():
            item = self.queue.get_nowait()
            if item is STOP:
                return items, True
            items.append(item)
            size += item.size or READ_BATCH_BYTES  # an unknown size ends the batch
        return items, False

    async def read_files(self, items: list[Item]) -> list[FileRead | InputError | None]:
        """The bytes of the file items among ``items`` (None for URLs and known failures)."""
        to_read = [item.kind == "file" and item.error_code is None for item in items]
        files = [item for item, read in zip(items, to_read, strict=True) if read]
        reads = iter(await read_images(files, self.config.max_file_bytes))
        return [next(reads) if read else None for read in to_read]

    @property
    def wants_body(self) -> bool:
        """Whether the transport sends JSON bodies (HTTP) or takes the image as it is (embedded)."""
        return self.client.wants_body

    async def build(
        self, item: Item, read: FileRead | InputError | None
    ) -> Record | tuple[Item, Payload] | None:
        """A record (an error, or tags reused from identical bytes), a payload to send, or
        None when a copy of the same bytes is in flight (its record brings this one's)."""
        if item.error_code is not None:
            return records.error_record(item, item.error_code, item.error or codes.message(item.error_code))
        facts = records.stat_facts(item)
        try:
            if read is None:
                return item, await build_payload(
                    item, self.client.appid, self.config.bucket, body=self.wants_body
                )
            if isinstance(read, InputError):
                raise read
            facts = read.facts or facts
            if facts is not None and facts.xxh3_128 is not None:
                claim = self.dedupe.claim(item, facts)
                if claim == FOLLOW:
                    return None
                if isinstance(claim, Record):
                    return claim
            payload = await image_payload(
                read.data,
                item.location,
                self.client.appid,
                self.config.bucket,
                self.config.max_image_bytes,
                body=self.wants_body,
            )
        except InputError as exc:
            return records.error_record(item, exc.code, exc.message, facts)
        except Exception as exc:  # a bug must cost one item, not the run
            return records.internal_error_record(item, exc, facts)
        payload.facts = facts
        return item, payload

    async def send(self) -> None:
        while (ready := await self.ready.get()) is not STOP:
            item, payload = ready
            started = time.monotonic()
            try:
                answer = await self.client.detect(payload)
            except RunStopped:
                raise  # credentials refused or no endpoint: no record, the whole run stops
            except Exception as exc:  # a bug must cost one item, not the run
                await self.results.put(records.internal_error_record(item, exc))
                continue
            elapsed_ms = round((time.monotonic() - started) * 1000)
            await self.results.put(
                records.result_record(item, answer, payload.notes, elapsed_ms, payload.facts)
            )

    # -- writer -----------------------------------------------------------------------------

    async def write(self) -> None:
        """Write records in batches: what arrives within ``WRITE_WINDOW_S`` of a record goes in
        one write. Writing each record as it came cost a thread hop per record (about a
        fifth of the client's CPU at a few hundred small requests a second); a SIGKILL now
        loses at most that window's answers, which a rerun asks again."""
        finished = False
        while not finished:
            batch = [await self.results.get()]
            if batch[0] is not STOP and self.results.qsize() < WRITE_BATCH:
                await asyncio.sleep(WRITE_WINDOW_S)
            while not self.results.empty() and len(batch) < WRITE_BATCH:
                batch.append(self.results.get_nowait())
            if STOP in batch:
                finished = True
                batch = [r for r in batch if r is not STOP]
            while batch:
                batch = await self.write_batch(batch)  # type: ignore[arg-type]

    async def write_batch(self, batch: list[Record]) -> list[Record]:
        """Write records with this run's settings; returns the records of copies that
        waited for one of them (written next)."""
        for record in batch:
            record.settings = self.settings
        offsets = await self.sink.write(batch)
        followers = []
        for record, offset in zip(batch, offsets, strict=True):
            self.summary.count(record)
            followers += self.dedupe.leader_done(record, offset)
        self.progress.advance(self.summary, len(batch))
        return followers

    # -- the whole run ----------------------------------------------------------------------

    def start_workers(self) -> list[asyncio.Task[None]]:
        """The stages between the producer's queue and the writer's results: here the
        preparers and senders; a cluster driver puts its dispatcher in their place."""
        tasks = [asyncio.create_task(self.prepare(), name=f"prepare-{i}") for i in range(self.preparers)]
        tasks += [asyncio.create_task(self.send(), name=f"send-{i}") for i in range(self.config.concurrency)]
        return tasks

    async def execute(self) -> Summary:
        started = time.monotonic()
        tasks = [asyncio.create_task(self.produce(), name="producer"), *self.start_workers()]
        writer = asyncio.create_task(self.write(), name="writer")
        writer.add_done_callback(lambda t: _cancel_on_failure(t, tasks))
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            self.summary.interrupted = True
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.results.put_nowait(STOP)
            await writer  # drains every finished record; raises SinkError if OUT failed
            self._walker.shutdown(wait=False, cancel_futures=True)
            self.summary.wall_s = time.monotonic() - started
            self.report_hidden_warnings()
        if self.summary.found == 0 and not self.summary.interrupted:
            log.warning("no items found in %s", " ".join(self.config.sources))
        return self.summary


def _cancel_on_failure(writer: asyncio.Task[None], tasks: list[asyncio.Task[None]]) -> None:
    if not writer.cancelled() and writer.exception() is not None:
        for task in tasks:
            task.cancel()


@contextlib.asynccontextmanager
async def opened_out(
    config: RunConfig, writer: Writer | None
) -> AsyncIterator[tuple[ResultSink, Checkpoint]]:
    """OUT locked and scanned off the event loop, so Ctrl-C during a long resume scan stops
    it within a moment instead of after the whole file; closed (fsync) at the end."""
    stop = threading.Event()
    settings = config.settings()
    created = not os.path.lexists(config.out)
    try:
        sink, checkpoint = await asyncio.to_thread(
            open_sink, config.out, config.retry_errors, stop, settings, writer
        )
    except asyncio.CancelledError:
        stop.set()  # the scan thread raises ScanStopped, closes OUT and ends
        raise
    try:
        if not config.retag:
            refuse_other_settings(checkpoint, settings, config.out)
        yield sink, checkpoint
    finally:
        await sink.close()
        if created and sink.size == 0:  # nothing found or nothing answered: no empty OUT left
            with contextlib.suppress(OSError):
                os.unlink(config.out)


def refuse_other_settings(checkpoint: Checkpoint, settings: Settings, out: str) -> None:
    """Never a silent mix of endpoints, taggers or languages in one OUT."""
    if not len(checkpoint.other_settings):
        return
    other = checkpoint.other_example.describe() if checkpoint.other_example else "other settings"
    raise ConfigError(
        f"{out} holds {len(checkpoint.other_settings):,} records made with {other}; this run uses "
        f"{settings.describe()}: use the same settings, another -o, or --retag to redo them into {out}"
    )


async def run_batch(
    config: RunConfig, progress: bool | None = None, *, writer: Writer | None = None
) -> Summary:
    """Tag every item of ``config.sources`` into ``config.out``; resumable, see sink.py.

    Raises ConfigError or SourceError for unusable settings and SinkError when OUT cannot
    be written (all UsageError, errors.py); ``writer`` replaces the disk (tests of a full
    disk). Interrupting the task (cancel) flushes finished
    records, then returns a summary with ``interrupted`` set.
    """
    started = time.monotonic()
    config.validate()
    for source in config.sources:
        check_source(source)
    if config.summary_json:
        check_summary_path(config.summary_json)
    refuse_out_among_sources(config.out, config.sources)
    if not config.is_local and is_plain_http_to_another_host(config.endpoint):
        log.warning(
            "%s is plain http: each request's signature travels in clear text and can be replayed "
            "until it expires; use https",
            config.endpoint_name,
        )
    bar = Progress(config.progress if progress is None else progress)
    try:
        async with opened_out(config, writer) as (sink, checkpoint):
            if config.cluster:
                from batchtag.cluster.driver import run_on_cluster

                summary = await run_on_cluster(config, sink, checkpoint, bar)
            else:
                async with open_client(config) as client:
                    summary = await Run(config, sink, checkpoint, client, bar).execute()
            summary.broken_lines = checkpoint.bad_lines
            summary.previous_errors = checkpoint.error_records - checkpoint.transient_errors
    finally:
        bar.close()
    summary.wall_s = time.monotonic() - started  # start-up (model load, resume scan) included
    if config.summary_json:
        summary.write_json(config.summary_json)
    return summary


@contextlib.asynccontextmanager
async def open_client(
    config: RunConfig, limiter: AdaptiveRateLimiter | None = None
) -> AsyncIterator[TagClient]:
    """The run's one client against its endpoint (the embedded tagger, in this process, when
    there is none); a cluster worker opens one a process, with its own limiter, and shares
    it between its chunks."""
    limiter = limiter or AdaptiveRateLimiter(config.qps)
    policy = RetryPolicy(retries=config.retries)
    if config.is_local:
        from batchtag.server import EmbeddedService, ServeConfig

        serve_config = ServeConfig(
            tagger=config.tagger,
            lang=config.lang,
            faces=config.faces,
            stages=config.stages,
            float_classifier=config.float_classifier,
        )
        async with EmbeddedService(serve_config) as service:
            yield embedded_client(service, limiter, policy)
        return
    credentials = Credentials(config.appid, config.secret_id, config.secret_key)
    async with open_tag_client(
        config.endpoint,
        credentials,
        config.bucket,
        limiter,
        policy,
        config.concurrency,
        config.timeout,
        EndpointHealth(public_url(config.endpoint), outage_wait_s=config.outage_wait),
    ) as client:
        yield client


def run(config: RunConfig, progress: bool | None = None) -> Summary:
    """Synchronous wrapper of ``run_batch`` for scripts and notebooks without a loop."""
    return asyncio.run(run_batch(config, progress))
