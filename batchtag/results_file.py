"""Is this file a batchtag results file? The one test, for the readers of OUT (export,
report, show) and for the sink before it appends: never write to a file that is not ours.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from batchtag.errors import NotAResultsFile
from batchtag.records import KEY_START, parse_record

HEAD_BYTES = 1 << 20  # a first line longer than this is not one of our records


def is_record_prefix(data: bytes) -> bool:
    """Whether ``data`` can be the beginning of a line our writer wrote."""
    head = data[: len(KEY_START)]
    return bool(head) and KEY_START.startswith(head) if len(head) < len(KEY_START) else head == KEY_START


def is_results_head(head: bytes, size: int) -> bool:
    """Whether a file of ``size`` bytes that starts with ``head`` (its first HEAD_BYTES)
    is a batchtag results file: empty, its first line a record in our layout or any valid
    record, or nothing but the start of one (the first write, cut by a crash). The one
    test for readers (``check_results_file``) and the writer (``sink``)."""
    if size == 0:
        return True
    newline = head.find(b"\n")
    if newline < 0:
        return size <= len(head) and is_record_prefix(head)
    first = head[: newline + 1]
    return first.startswith(KEY_START) or parse_record(first) is not None


def check_results_file(path: str, handle: BinaryIO | None = None) -> None:
    """Readers that take OUT from a user call this first, and the sink on the OUT it has
    opened (``handle``; read with pread, never written): an empty file is fine, a file whose
    first line is not a record (a photo, someone's notes) is NotAResultsFile, and a missing
    or unreadable one raises OSError."""
    if handle is None:
        with open(path, "rb") as opened:
            return check_results_file(path, opened)
    fd = handle.fileno()
    size = os.fstat(fd).st_size
    if not is_results_head(os.pread(fd, min(size, HEAD_BYTES), 0), size):
        raise NotAResultsFile(f"{path} is not a batchtag results file")
