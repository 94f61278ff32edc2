"""The local middle stage: preparers read, check and encode ahead of N senders, which pace,
sign, POST and retry, in this process.

    items --> preparers (payload: read, check, encode) --ready--> N senders (client) --> results

``open_client`` opens the run's one client (the embedded tagger, in this process, when there
is no endpoint); a cluster worker opens one a process and runs this stage on each chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from batchtag import codes
from batchtag.config import RunConfig, public_url
from batchtag.errors import InputError, RunStopped
from batchtag.pipeline import recording
from batchtag.pipeline.budget import RequestBudget, RequestLimitReached
from batchtag.pipeline.client import EndpointHealth, RetryPolicy, TagClient, embedded_client, open_tag_client
from batchtag.pipeline.dedupe import FOLLOW, Dedupe
from batchtag.pipeline.endpoints import EndpointPool, open_endpoint_pool
from batchtag.pipeline.payload import (
    READ_BATCH_BYTES,
    READ_BATCH_FILES,
    FileRead,
    Payload,
    build_payload,
    image_payload,
    read_images,
)
from batchtag.pipeline.ratelimit import LimiterFor, own_limiter
from batchtag.pipeline.sources import Item
from batchtag.pipeline.stage import STOP, Ends
from batchtag.records import Record
from batchtag.signing import Credentials


class LocalStage:
    """Prepare and send here: a ``stage.MiddleStage``."""

    def __init__(self, config: RunConfig, client: TagClient | EndpointPool) -> None:
        self.config = config
        self.client = client
        self.limit_reached = False  # --max-requests spent: what is left is passed over
        # A few preparers keep a small buffer of encoded payloads ahead of the senders; small,
        # because a payload can be 13 MB of base64.
        self.preparers = max(1, min(8, config.concurrency // 4))
        self._preparers_left = self.preparers
        self.ready: asyncio.Queue[tuple[Item, Payload] | None] = asyncio.Queue(maxsize=self.preparers * 2)
        # The run's ends, given at start():
        self.items: asyncio.Queue[Item | None]
        self.results: asyncio.Queue[Record | None]
        self.dedupe: Dedupe

    @property
    def consumers(self) -> int:
        return self.preparers

    @property
    def queue_size(self) -> int:
        return self.config.concurrency * 4

    def start(self, ends: Ends) -> list[asyncio.Task[None]]:
        self.items, self.results, self.dedupe = ends.items, ends.results, ends.dedupe
        self.summary = ends.summary
        tasks = [asyncio.create_task(self.prepare(), name=f"prepare-{i}") for i in range(self.preparers)]
        tasks += [asyncio.create_task(self.send(), name=f"send-{i}") for i in range(self.config.concurrency)]
        return tasks

    async def prepare(self) -> None:
        """Read and encode ahead of the senders, so a sender never waits on the disk
        between two requests (a worker that did both idled for each file read)."""
        stopped = False
        while not stopped:
            items, stopped = await self.next_items()
            if self.limit_reached:
                continue  # --max-requests spent: passed over, as the senders do
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
        item = await self.items.get()
        if item is STOP:
            return [], True
        items, size = [item], item.size or 0
        while len(items) < READ_BATCH_FILES and size < READ_BATCH_BYTES and not self.items.empty():
            item = self.items.get_nowait()
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
            return recording.error_record(item, item.error_code, item.error or codes.message(item.error_code))
        facts = recording.stat_facts(item)
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
            return recording.error_record(item, exc.code, exc.message, facts)
        except Exception as exc:  # a bug must cost one item, not the run
            return recording.internal_error_record(item, exc, facts)
        payload.facts = facts
        return item, payload

    async def send(self) -> None:
        while (ready := await self.ready.get()) is not STOP:
            item, payload = ready
            if self.limit_reached:
                continue  # not sent, no record: a rerun does it like any item a stop left
            started = time.monotonic()
            try:
                answer = await self.client.detect(payload)
            except RequestLimitReached:
                self.stop_sending()
                continue
            except RunStopped:
                raise  # credentials refused or no endpoint: no record, the whole run stops
            except Exception as exc:  # a bug must cost one item, not the run
                await self.results.put(recording.internal_error_record(item, exc))
                continue
            elapsed_ms = round((time.monotonic() - started) * 1000)
            record = recording.result_record(item, answer, payload.notes, elapsed_ms, payload.facts)
            if answer.endpoint is not None:
                record.extra["endpoint"] = answer.endpoint
            await self.results.put(record)

    def stop_sending(self) -> None:
        """--max-requests spent: every request in flight finishes and is written; the items
        still coming are passed over unsent (the walk runs to its end, so every task ends
        as in a finished run) and the run ends as a clean stop with its own exit status."""
        self.limit_reached = True
        self.summary.limit_reached = True


@contextlib.asynccontextmanager
async def open_client(
    config: RunConfig, limiter_for: LimiterFor = own_limiter, budget: RequestBudget | None = None
) -> AsyncIterator[TagClient]:
    """The run's one client against its endpoint (the embedded tagger, in this process, when
    there is none; an ``EndpointPool`` for several). A cluster worker opens one a process and
    shares it between its chunks: its ``limiter_for`` paces each endpoint at the worker's
    share of its quota, and its ``budget`` spends each chunk's grant of ``--max-requests``."""
    policy = RetryPolicy(retries=config.retries)
    if budget is None and config.max_requests:
        budget = RequestBudget(config.max_requests)
    if config.endpoints:
        async with open_endpoint_pool(
            config.endpoint_specs,
            config.bucket,
            policy,
            config.concurrency,
            config.timeout,
            config.outage_wait,
            budget,
            limiter_for,
        ) as pool:
            yield pool  # type: ignore[misc]
        return
    limiter = limiter_for(config.endpoint if config.is_local else config.endpoint_name, config.qps)
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
            yield embedded_client(service, limiter, policy, budget)
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
        EndpointHealth(public_url(config.endpoint), outage_wait_s=config.outage_wait, clock=policy.clock),
        budget,
    ) as client:
        yield client
