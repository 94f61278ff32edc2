"""Natural batching: concurrent requests share one ``tagger.tag_batch`` call.

Batches run on a dedicated single worker thread, so model calls never overlap and never
compete with each other for the CPU. When that thread is idle, whatever is queued runs at
once: a lone request goes straight through and waits for nobody. While a batch runs, new
arrivals queue up and together form the next batch (up to ``max_batch``), so batches grow
by themselves exactly when the tagger is the bottleneck, and stay at one under light load.

``wait_ms`` (default 0) optionally holds an under-full batch back up to that long for
company before it starts. Measured with the model tagger it did not pay (see
``ServeConfig.batch_wait_ms``); it is kept for experiments.

The items are whatever the server queued: the tagger's ``prepare`` output, or images.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from batchtag.taggers import Tag, Tagger

log = logging.getLogger(__name__)


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    max_batch_size: int = 0
    failed_batches: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches

    def record(self, size: int) -> None:
        self.batches += 1
        self.images += size
        self.max_batch_size = max(self.max_batch_size, size)
        self.sizes[size] = self.sizes.get(size, 0) + 1

    def as_dict(self) -> dict[str, object]:
        return {
            "batches": self.batches,
            "images": self.images,
            "mean_batch_size": round(self.images / self.batches, 3) if self.batches else 0.0,
            "max_batch_size": self.max_batch_size,
            "failed_batches": self.failed_batches,
            "batch_sizes": {str(size): count for size, count in sorted(self.sizes.items())},
        }


_Pending = tuple[Any, "asyncio.Future[list[Tag]]"]


class Batcher:
    def __init__(self, tagger: Tagger, max_batch: int | None = None, wait_ms: float = 0.0) -> None:
        self.tagger = tagger
        self.max_batch = max(1, max_batch or tagger.max_batch)
        self.wait_s = max(0.0, wait_ms) / 1000
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchtag-tagger")
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run_forever(), name="batcher")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("server shutting down"))
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def tag(self, item: Any) -> list[Tag]:
        """The tags for one item (a prepared image), computed with whatever else is queued."""
        if not self.running:
            raise RuntimeError("batcher is not running")
        future: asyncio.Future[list[Tag]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _run_forever(self) -> None:
        while True:
            batch = await self._collect_batch()
            live = [(item, future) for item, future in batch if not future.done()]
            if live:  # requests whose clients went away are skipped, not tagged
                await self._run_batch(live)

    async def _collect_batch(self) -> list[_Pending]:
        """Everything queued (up to ``max_batch``); waits only for the first, or ``wait_s``."""
        batch = [await self._queue.get()]
        self._drain_into(batch)
        if self.wait_s <= 0:
            return batch
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
            self._drain_into(batch)
        return batch

    def _drain_into(self, batch: list[_Pending]) -> None:
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _run_batch(self, batch: list[_Pending]) -> None:
        items = [item for item, _ in batch]
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self.tagger.tag_batch, items)
            if len(results) != len(items):
                raise RuntimeError(f"tagger returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            self.stats.failed_batches += 1
            log.exception("tagger %s failed on a batch of %d images", self.tagger.name, len(items))
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self.stats.record(len(items))
        for (_, future), tags in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(tags)
