"""The sink: the only code that touches OUT, which is both the results and the checkpoint.

A record is appended once its item is final, so "has a record in OUT" is exactly "done":
a rerun skips those keys and nothing is written twice. Each batch of records goes to the
kernel in one write, so SIGKILL can lose only the items still in flight; a crash in the
middle of a write leaves at most one torn last line, which the next run cuts off (the
item it belonged to is simply done again). An advisory lock on OUT stops two runs from
appending to the same file.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from typing import BinaryIO

from batchtag.errors import SinkError
from batchtag.records import Record, Settings, read_key_bytes_and_status, valid_line_mask
from batchtag.resume import Checkpoint, read_checkpoint

log = logging.getLogger(__name__)

FSYNC_INTERVAL_S = 2.0


def repair_torn_tail(handle: BinaryIO) -> int:
    """Cut OUT back to its last complete line; the number of bytes removed."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return 0
    chunk = 65_536
    position = size
    while position > 0:
        start = max(0, position - chunk)
        handle.seek(start)
        block = handle.read(position - start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        position = start
    else:
        keep = 0
    if keep < size:
        handle.truncate(keep)
    return size - keep


def drop_error_records(path: str) -> int:
    """Rewrite OUT with only the valid record of each key, less the errors, atomically
    (temp file, fsync, rename), so ``--retry-errors`` can do those items again and OUT
    holds one record a key afterwards. Returns how many error records were dropped."""
    if not os.path.exists(path):
        return 0
    directory = os.path.dirname(os.path.abspath(path))
    dropped = 0
    valid = valid_line_mask(path)
    fd, temp = tempfile.mkstemp(prefix=".batchtag-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as source:
            for index, raw in enumerate(source):
                if index >= len(valid) or not valid[index]:
                    continue  # superseded by a later record of its key, or not a record
                _, status = read_key_bytes_and_status(raw)
                if status == "error":
                    dropped += 1
                else:
                    out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
        fsync_directory(directory)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return dropped


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultSink:
    """Appends records to OUT; open with ``open_sink``."""

    def __init__(self, path: str, handle: BinaryIO) -> None:
        self.path = path
        self._handle = handle
        self._last_fsync = time.monotonic()
        self.written = 0
        self.size = os.fstat(handle.fileno()).st_size  # where the next record starts

    async def write(self, records: list[Record]) -> list[int]:
        """One write syscall for the batch, so a crash tears at most the last line.
        Returns each record's byte offset in OUT (for the content index)."""
        if not records:
            return []
        lines = [record.to_line() for record in records]
        offsets = []
        for line in lines:
            offsets.append(self.size)
            self.size += len(line)
        try:
            await asyncio.to_thread(self._write_through, b"".join(lines))
        except OSError as exc:
            raise SinkError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self.written += len(records)
        return offsets

    def read_record_at(self, offset: int) -> Record | None:
        """The record whose line starts at ``offset`` (an earlier one to reuse), or None."""
        chunks = []
        position = offset
        while True:
            chunk = os.pread(self._handle.fileno(), 65_536, position)
            if not chunk:
                return None
            newline = chunk.find(b"\n")
            if newline >= 0:
                chunks.append(chunk[: newline + 1])
                break
            chunks.append(chunk)
            position += len(chunk)
        try:
            return Record.from_dict(json.loads(b"".join(chunks)))
        except (ValueError, TypeError, KeyError):
            return None

    def _write_through(self, data: bytes) -> None:
        view = memoryview(data)
        fd = self._handle.fileno()
        while view:
            view = view[os.write(fd, view) :]
        if time.monotonic() - self._last_fsync >= FSYNC_INTERVAL_S:
            os.fsync(fd)
            self._last_fsync = time.monotonic()

    async def close(self) -> None:
        try:
            await asyncio.to_thread(os.fsync, self._handle.fileno())
        except OSError as exc:
            log.warning("fsync of %s failed: %s", self.path, exc)
        finally:
            self._handle.close()


def open_sink(
    path: str,
    retry_errors: bool = False,
    stop: threading.Event | None = None,
    settings: Settings | None = None,
) -> tuple[ResultSink, Checkpoint]:
    """Lock OUT, repair a torn tail, optionally drop error records, read the checkpoint.

    Blocking (a million records take seconds): run it in a thread, and set ``stop`` to
    abandon the checkpoint scan (it raises ``resume.ScanStopped``, OUT is closed).
    """
    if os.path.exists(path) and not os.path.isfile(path):
        kind = "Is a directory" if os.path.isdir(path) else "not a regular file"
        raise SinkError(f"cannot use {path}: {kind} (OUT is appended to and read back as the checkpoint)")
    try:
        handle = open(path, "ab+", buffering=0)  # noqa: SIM115 - owned by ResultSink
    except OSError as exc:
        raise SinkError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        lock(handle, path)
        torn = repair_torn_tail(handle)
        if torn:
            log.warning("%s ended with a torn record (%d bytes, from a crash); cut it off", path, torn)
        if retry_errors:
            dropped = drop_error_records(path)
            handle.close()  # the old inode was replaced: reopen and lock the new file
            handle = open(path, "ab+", buffering=0)  # noqa: SIM115
            lock(handle, path)
            if dropped:
                log.info("--retry-errors: %d error records removed from %s, to be done again", dropped, path)
        checkpoint = read_checkpoint(path, stop, settings)
        checkpoint.torn_bytes = torn
    except BaseException:
        handle.close()
        raise
    return ResultSink(path, handle), checkpoint


def lock(handle: BinaryIO, path: str) -> None:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SinkError(f"{path} is in use by another batchtag run") from None
