"""One run: the same object for a plain and a cluster run, its middle stage passed in.

    producer (sources, resume filter)  --items-->  middle stage  --results-->  one writer (sink)

The producer walks the sources once and drops what OUT already holds; the writer writes
records in batches, hands copies of identical bytes their leader's record and keeps the
summary and the bar. What turns items into records is a ``stage.MiddleStage`` the caller
picks (``local.LocalStage``: prepare and send here; ``cluster.driver.ClusterStage``: send
through Dask). The queues are bounded, so memory stays flat however large the input; only
the writer touches the sink.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from batchtag.config import RunConfig
from batchtag.pipeline.dedupe import Dedupe
from batchtag.pipeline.excludes import WalkRules
from batchtag.pipeline.ledger import Ledger
from batchtag.pipeline.progress import Progress, Summary
from batchtag.pipeline.resume import Checkpoint, ResumeFilter, Skipped
from batchtag.pipeline.sources import Chunk, Item, Walk, iter_chunks
from batchtag.pipeline.stage import STOP, Ends, MiddleStage, RecordSink
from batchtag.records import Record

log = logging.getLogger("batchtag")

CHUNK = 2048  # items pulled from the (blocking) source walker per thread hop (a .txt block: more)
WRITE_WINDOW_S = 0.05  # records finished within this time share one write
WRITE_BATCH = 1024  # records a write at most
WARNINGS_SHOWN = 5  # then only a count, at the end


class Run:
    """One run's producer, writer and summary around ``middle``; ``execute`` drives it."""

    def __init__(
        self,
        config: RunConfig,
        sink: RecordSink,
        checkpoint: Checkpoint,
        progress: Progress,
        middle: MiddleStage,
    ) -> None:
        self.config = config
        self.sink = sink
        self.progress = progress
        self.middle = middle
        self.summary = Summary(out=config.out, fail_on=config.fail_on)
        self.checkpoint = checkpoint
        self.ledger = Ledger(checkpoint)
        self.summary.run_id = self.ledger.run_id
        self.queue: asyncio.Queue[Item | None] = asyncio.Queue(maxsize=middle.queue_size)
        self.results: asyncio.Queue[Record | None] = asyncio.Queue()
        self.resume = ResumeFilter(checkpoint)
        self.settings = config.settings()
        rules = WalkRules(tuple(config.exclude), config.include_hidden)
        self.walk = Walk(rules=rules, left_out=self.summary.left_out)
        self.dedupe = Dedupe(checkpoint.content, sink.read_record_at)
        self.ends = Ends(self.queue, self.results, self.dedupe, self.summary)
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
        iterator = iter_chunks(self.config.sources, walk=self.walk, size=CHUNK)
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
        for _ in range(self.middle.consumers):
            await self.queue.put(STOP)

    def next_chunk(self, iterator: Iterator[Chunk]) -> tuple[list[Item], Skipped] | None:
        """The next chunk's items still to do (walker thread); None at the end."""
        chunk = next(iterator, None)
        if chunk is None:
            return None
        fresh, _, skipped = self.resume.fresh_in(chunk)
        return fresh, skipped

    # -- writer -----------------------------------------------------------------------------

    async def write(self) -> None:
        """Write records in batches: what arrives within ``WRITE_WINDOW_S`` of a record goes in
        one write. Writing each record as it came cost a thread hop per record (about a
        fifth of the client's CPU at a few hundred small requests a second); a SIGKILL now
        loses at most that window's answers, which a rerun asks again."""
        finished = False
        while not finished:
            taken = [await self.results.get()]
            if taken[0] is not STOP and self.results.qsize() < WRITE_BATCH:
                await asyncio.sleep(WRITE_WINDOW_S)
            while not self.results.empty() and len(taken) < WRITE_BATCH:
                taken.append(self.results.get_nowait())
            batch = [record for record in taken if record is not STOP]
            finished = len(batch) < len(taken)
            while batch:
                batch = await self.write_batch(batch)

    async def write_batch(self, batch: list[Record]) -> list[Record]:
        """Write records with this run's settings; returns the records of copies that
        waited for one of them (written next)."""
        for record in batch:
            record.settings = self.settings
        self.ledger.stamp(batch)
        offsets = await self.sink.write(batch)
        followers = []
        for record, offset in zip(batch, offsets, strict=True):
            self.summary.count(record)
            followers += self.dedupe.leader_done(record, offset)
        self.progress.advance(self.summary, len(batch))
        return followers

    # -- the whole run ----------------------------------------------------------------------

    async def execute(self) -> Summary:
        started = time.monotonic()
        tasks = [asyncio.create_task(self.produce(), name="producer"), *self.middle.start(self.ends)]
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
        self.summary.add_errors(self.ledger.errors, self.checkpoint)
        return self.summary


def _cancel_on_failure(writer: asyncio.Task[None], tasks: list[asyncio.Task[None]]) -> None:
    if not writer.cancelled() and writer.exception() is not None:
        for task in tasks:
            task.cancel()
