"""Identical bytes are sent once: later copies get the first one's tags.

Within a run, the first file with given content (by XXH3-128) is the leader and is sent;
copies met while it is in flight wait as followers (item and facts only, no bytes) and
get their records when the leader's record is written. Across runs, the checkpoint's
content index points at an ok record in OUT made with the same settings. A reused record
names the record it copies in ``reused``; a moved archive is tagged again this way
without a single request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from batchtag.keyset import MERGE_EVERY
from batchtag.pipeline.sources import Item
from batchtag.records import FileFacts, Record, content_fingerprint

FOLLOW = "follow"
LEAD = "lead"


@dataclass
class ContentIndex:
    """Content-hash fingerprints (sorted) and the byte offset of an ok record for each;
    records written during the run collect in a small dict merged in now and then, so a
    million new files cost 16 bytes each, not a dict entry each."""

    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    offsets: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    recent: dict[int, int] = field(default_factory=dict)

    def find(self, fp: int) -> int | None:
        if fp in self.recent:
            return self.recent[fp]
        if not len(self.hashes):  # a first run: skip numpy's per-call cost
            return None
        index = int(np.searchsorted(self.hashes, np.uint64(fp)))
        if index < len(self.hashes) and int(self.hashes[index]) == fp:
            return int(self.offsets[index])
        return None

    def add(self, fp: int, offset: int) -> None:
        self.recent[fp] = offset
        if len(self.recent) >= MERGE_EVERY:
            new = np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent))
            at = np.fromiter(self.recent.values(), dtype=np.int64, count=len(self.recent))
            hashes = np.concatenate((self.hashes, new))
            order = np.argsort(hashes, kind="stable")
            self.hashes, self.offsets = hashes[order], np.concatenate((self.offsets, at))[order]
            self.recent.clear()

    def __len__(self) -> int:
        return len(self.hashes) + len(self.recent)


@dataclass
class Dedupe:
    index: ContentIndex
    read_record_at: Callable[[int], Record | None]
    waiting: dict[str, list[tuple[Item, FileFacts]]] = field(default_factory=dict)

    def claim(self, item: Item, facts: FileFacts) -> Record | str:
        """A record copied from identical bytes already tagged, or FOLLOW (a copy is in
        flight: its record will come from ``leader_done``), or LEAD (send this one)."""
        digest = facts.xxh3_128
        assert digest is not None
        earlier = self.earlier_record(digest)
        if earlier is not None:
            return reuse_record(item, facts, earlier)
        if digest in self.waiting:
            self.waiting[digest].append((item, facts))
            return FOLLOW
        self.waiting[digest] = []
        return LEAD

    def earlier_record(self, digest: str) -> Record | None:
        offset = self.index.find(content_fingerprint(digest))
        if offset is None:
            return None
        record = self.read_record_at(offset)
        # The index holds 64 bits of the hash: the record's full hash must agree.
        if record is None or not record.ok or record.file is None or record.file.xxh3_128 != digest:
            return None
        return record

    def leader_done(self, record: Record, offset: int) -> list[Record]:
        """Note a written record; the records of the copies that waited for it."""
        digest = record.file.xxh3_128 if record.file else None
        if digest is None or record.extra.get("reused"):
            return []
        if record.ok:
            self.index.add(content_fingerprint(digest), offset)
        followers = self.waiting.pop(digest, [])
        return [reuse_record(item, facts, record) for item, facts in followers]


def reuse_record(item: Item, facts: FileFacts, earlier: Record) -> Record:
    """This item's record, with the outcome of ``earlier`` (same bytes, same settings)."""
    return Record(
        item.key,
        item.kind,
        earlier.status,
        earlier.code,
        earlier.message,
        earlier.tags,
        0,
        {"reused": earlier.key},
        file=facts,
    )
