"""What the exporters share: reading OUT with a progress bar, and the tag filter."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from tqdm import tqdm

from batchtag.records import Record, iter_valid_records
from batchtag.results_file import check_results_file


def tags_at_least(record: Record, min_confidence: int) -> list[dict[str, Any]]:
    """The record's tags with a confidence of ``min_confidence`` or more, in its order."""
    return [t for t in record.tags if t["tag_confidence"] >= min_confidence]


def at_confidence(records: Iterable[Record], min_confidence: int) -> Iterator[Record]:
    """The records with their tags below ``min_confidence`` left out (what the report shows)."""
    for record in records:
        kept = tags_at_least(record, min_confidence)
        yield record if len(kept) == len(record.tags) else dataclasses.replace(record, tags=kept)


@contextmanager
def progress_bar(description: str, enabled: bool | None = None) -> Iterator[tqdm]:
    """A tqdm bar on stderr; ``None`` shows it only when stderr is a terminal."""
    bar = tqdm(desc=description, unit=" items", disable=None if enabled is None else not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def read_records(path: str, bar: tqdm) -> Iterator[Record]:
    """OUT's valid records, one a key, ticking ``bar`` (which learns its total first).
    OSError or NotAResultsFile before anything is written when OUT is not usable."""
    check_results_file(path)
    return _ticking(path, bar)


def _ticking(path: str, bar: tqdm) -> Iterator[Record]:

    def set_total(count: int) -> None:
        bar.total = count
        bar.refresh()

    for record in iter_valid_records(path, on_count=set_total):
        yield record
        bar.update()


@contextmanager
def replaced_atomically(path: str, mode: str, durable: bool = True, **open_args: Any) -> Iterator[IO[Any]]:
    """A temp file beside ``path`` that becomes ``path`` (rename) only when writing
    succeeded: readers see the old file or the new one, never half (fsynced first unless
    ``durable`` is off, for files as cheap to remake as thumbnails). A file that is
    replaced keeps its mode (and its owner when we are root); a new one gets the umask's."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        previous: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        previous = None
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_args) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if previous is None:
            os.chmod(temp, 0o666 & ~current_umask())
        else:
            os.chmod(temp, previous.st_mode & 0o7777)
            if os.geteuid() == 0 and (previous.st_uid, previous.st_gid) != (0, 0):
                os.chown(temp, previous.st_uid, previous.st_gid)  # someone's photos stay theirs
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
