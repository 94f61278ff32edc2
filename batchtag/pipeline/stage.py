"""The seam in the middle of a run: what a middle stage is handed and what it promises.

A run's two ends are the same whatever tags the items: the producer (walk, resume, drop
repeats) fills ``Ends.items``; the writer (dedupe followers, sink, summary, bar) drains
``Ends.results``. Between them runs one ``MiddleStage``: preparers and senders in this
process (``local.LocalStage``) or a dispatcher to Dask (``cluster.driver.ClusterStage``).
The entry point (``batch.run_batch``) picks it; nothing here knows the cluster exists.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from batchtag.pipeline.dedupe import Dedupe
from batchtag.pipeline.progress import Summary
from batchtag.pipeline.sources import Item
from batchtag.records import Record

STOP = None  # the end of a queue


class RecordSink(Protocol):
    """What the writer writes to: OUT (``sink.ResultSink``) or a chunk's list on a Dask
    worker. Offsets let a copy of identical bytes read its leader's record back."""

    async def write(self, records: list[Record]) -> list[int]: ...

    def read_record_at(self, offset: int) -> Record | None: ...


@dataclass
class Ends:
    """What a middle stage takes items from and gives records to."""

    items: asyncio.Queue[Item | None]  # ends with ``MiddleStage.consumers`` STOPs
    results: asyncio.Queue[Record | None]
    dedupe: Dedupe
    summary: Summary


class MiddleStage(Protocol):
    """Turns the producer's items into records for the writer."""

    @property
    def consumers(self) -> int:
        """The tasks that take from ``Ends.items``: the producer ends with one STOP each."""
        ...

    @property
    def queue_size(self) -> int:
        """How many items ``Ends.items`` holds (memory stays flat however large the input)."""
        ...

    def start(self, ends: Ends) -> list[asyncio.Task[None]]:
        """Its tasks, running; they end once every item's record is in ``ends.results``."""
        ...
