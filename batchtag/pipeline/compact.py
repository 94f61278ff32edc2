"""``batchtag compact OUT [--drop-missing]``: one record per key, nothing superseded.

A changed file, ``--retag`` and a transient error done again each append a newer record
for a key; the last complete one is valid and every reader skips the rest, but OUT grows
and ``jq``/pandas readers see every line. Compaction rewrites OUT to its valid records
(and the lines that are not records, kept as they are, as ``--retry-errors`` keeps them);
with ``--drop-missing`` also without the records of files that are no longer there (an
archive that moved leaves its old paths' records behind).

The rewrite is the sink's (``sink.rewrite_out``: OUT locked, a temp file beside it, fsync,
rename, mode and owner kept), so a SIGKILL at any instant leaves OUT complete, old or new.
A run compacts by itself at start (``sink.should_compact``, in the sink so that opening OUT
needs nothing of this module) once superseded records are more than ``sink.AUTO_SHARE`` of
OUT's record lines and at least ``sink.AUTO_MIN_SUPERSEDED``: see README's "Compaction" for
what that share was chosen from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from batchtag.errors import SinkError
from batchtag.pipeline.sink import (
    copy_valid_lines,
    open_locked,
    refuse_what_is_not_ours,
    remove_stale_temps,
    repair_torn_tail,
    rewrite_out,
)
from batchtag.records import parse_record


@dataclass
class CompactCounts:
    lines: int = 0  # record lines before (broken lines not counted)
    kept: int = 0  # records after: one a key
    superseded: int = 0  # records dropped because a later one of their key is valid
    missing: int = 0  # valid records of files no longer there (--drop-missing)
    torn_bytes: int = 0


def file_is_gone(line: bytes) -> bool:
    """A valid record of a file that no longer exists (urls are never 'missing')."""
    record = parse_record(line)
    return record is not None and record.source == "file" and not os.path.lexists(record.key)


def compact(path: str, drop_missing: bool = False) -> CompactCounts:
    """Rewrite OUT to one record per key, atomically; SinkError when OUT is not usable
    (missing, not ours, locked by a run, its folder not writable)."""
    if not os.path.isfile(path):
        raise SinkError(f"{path}: no such results file")
    handle = open_locked(path)
    try:
        refuse_what_is_not_ours(handle, path)
        counts = CompactCounts(torn_bytes=repair_torn_tail(handle, path))
        remove_stale_temps(path)

        def keep(line: bytes) -> bool:
            if drop_missing and file_is_gone(line):
                counts.missing += 1
                return False
            return True

        def copy(source: int, target: int) -> None:
            counts.lines, valid = copy_valid_lines(path, source, target, keep)
            counts.superseded, counts.kept = counts.lines - valid, valid - counts.missing

        handle = rewrite_out(path, handle, copy)
    finally:
        handle.close()
    return counts
