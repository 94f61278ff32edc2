"""The sink: the only code that touches OUT, which is both the results and the checkpoint.

A record is appended once its item is final, so "has a complete record in OUT" is exactly
"done": a rerun skips those keys and nothing is written twice. Each batch of records goes
to the kernel in one write, so SIGKILL can lose only the items still in flight; a crash in
the middle of a write leaves at most one torn last line, which the next run cuts off (the
item it belonged to is simply done again). Lines elsewhere that are not complete records
are never touched: they are counted, reported, and their items done again. An advisory
lock on OUT stops two runs from appending to the same file.

OUT is written only when it is recognisably ours (missing, empty, or its first line is a
record), so a slip such as ``-o holiday.jpg`` costs nothing but an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import signal
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Protocol

from batchtag.codes import DEFAULT_MAX_ATTEMPTS
from batchtag.errors import NotAResultsFile, SinkError
from batchtag.keyset import KeySet, fingerprint_bytes
from batchtag.pipeline.resume import Checkpoint, read_checkpoint
from batchtag.records import (
    KEY_START,
    Record,
    Settings,
    parse_record,
    read_key_bytes_and_status,
    record_line_masks,
)
from batchtag.results_file import check_results_file, is_record_prefix

log = logging.getLogger(__name__)

FSYNC_INTERVAL_S = 2.0
LOCK_TRIES = 5  # OUT replaced between our open and our lock this often: give up


class Writer(Protocol):
    """How bytes reach OUT's file descriptor: the real disk, or a test's failing one."""

    def write(self, fd: int, data: memoryview) -> int:
        """Write some of ``data``; how many bytes went (a short write is allowed)."""
        ...

    def fsync(self, fd: int) -> None: ...


class OsWriter:
    """The real disk: ``os.write`` and ``os.fsync``."""

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)


def refuse_what_is_not_ours(handle: BinaryIO, path: str) -> None:
    """``results_file.check_results_file`` on the opened OUT, worded for a run's ``-o``
    (SinkError): the file is left untouched."""
    try:
        check_results_file(path, handle)
    except NotAResultsFile:
        raise SinkError(
            f"{path} exists and is not a batchtag results file (its first line is not a record); "
            "it was left untouched: give -o a new file or an earlier OUT"
        ) from None


def repair_torn_tail(handle: BinaryIO, path: str = "OUT") -> int:
    """Cut OUT back to its last complete line; the number of bytes removed. Only the start
    of a record is ever cut: other trailing bytes mean the file is not (only) ours."""
    fd = handle.fileno()
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    chunk = 65_536
    position = size
    keep = 0
    while position > 0:
        start = max(0, position - chunk)
        newline = os.pread(fd, position - start, start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        position = start
    if keep == size:
        return 0
    if not is_record_prefix(os.pread(fd, len(KEY_START), keep)):
        raise SinkError(
            f"{path} ends with {size - keep} bytes that are not the start of a record; it was left untouched"
        )
    os.ftruncate(fd, keep)
    return size - keep


def temp_prefix(path: str) -> str:
    """Our rewrite temp files for ``path``: recognisable, so a crash's leftovers can go."""
    return f".{os.path.basename(path)}.batchtag-rewrite-"


def remove_stale_temps(path: str) -> int:
    """Delete rewrite temp files a crashed run left beside OUT (we hold OUT's lock, so no
    live run is writing one). Returns how many went."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = temp_prefix(path)
    removed = 0
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)
                        removed += 1
    return removed


def write_all(fd: int, data: bytes, writer: Writer | None = None) -> None:
    """All of ``data``, however short each write is."""
    writer = writer or OsWriter()
    view = memoryview(data)
    while view:
        view = view[writer.write(fd, view) :]


KeepLine = Callable[[bytes], bool]


def copy_valid_lines(
    path: str, source_fd: int, target_fd: int, keep: KeepLine | None = None
) -> tuple[int, int]:
    """Copy OUT's lines to ``target_fd``: each key's valid record when ``keep`` says so (all
    of them without ``keep``), and every line that is not a record, as it was (only a torn
    last line is ever cut); records superseded by a later one of their key go. Returns the
    record lines read and the valid records among them."""
    pending: list[bytes] = []
    held: list[bytes] | None = []  # lines before the first record: they follow it, so the
    size = 0  # copy still starts with a record (``is_results_head``) and stays ours
    flushed = False
    valid, is_record = record_line_masks(path)
    with os.fdopen(os.dup(source_fd), "rb") as source:
        source.seek(0)
        for index, line in enumerate(source):
            known = index < len(valid)
            if known and valid[index]:
                if keep is not None and not keep(line):
                    continue
                if held is not None:
                    pending += [line, *held]
                    size += len(line) + sum(map(len, held))
                    held = None
                    continue
            elif is_record[index] if known else parse_record(line) is not None:
                continue  # superseded by a later record of its key
            elif held is not None:
                held.append(line)
                continue
            pending.append(line)
            size += len(line)
            if size >= 1 << 20:
                write_all(target_fd, b"".join(pending))
                pending, size = [], 0
                if not flushed:
                    flushed = True
                    pause_at("rewrite-copying")
    write_all(target_fd, b"".join(pending + (held or [])))
    return int(is_record.sum()), int(valid.sum())


def copy_without_errors(path: str, source_fd: int, target_fd: int) -> KeySet:
    """``--retry-errors``: the valid records that are not errors (``copy_valid_lines``).
    Returns the keys of the errors dropped (a failure of theirs in this run is not new)."""
    dropped: list[int] = []

    def not_an_error(line: bytes) -> bool:
        key, status = read_key_bytes_and_status(line)
        if status == "error":
            dropped.append(fingerprint_bytes(key))
            return False
        return True

    copy_valid_lines(path, source_fd, target_fd, not_an_error)
    return KeySet(dropped)


def rewrite_without_errors(path: str, handle: BinaryIO) -> tuple[BinaryIO, KeySet]:
    """``--retry-errors``: replace OUT with a copy without its error records; see
    ``rewrite_out``. Returns the new handle and the keys of the errors dropped."""
    dropped = KeySet()

    def copy(source_fd: int, target_fd: int) -> None:
        nonlocal dropped
        dropped = copy_without_errors(path, source_fd, target_fd)

    return rewrite_out(path, handle, copy), dropped


def rewrite_out(path: str, handle: BinaryIO, copy: Callable[[int, int], object]) -> BinaryIO:
    """Replace OUT (open and locked as ``handle``) with what ``copy(source_fd, target_fd)``
    writes, atomically (temp file beside it, fsync, rename, fsync of the folder), keeping
    OUT's mode and owner. The copy is locked before the rename, so no other run can slip in
    between; it is returned as the new handle (``handle`` is closed). A crash at any point
    leaves OUT whole, old or new; the temp file it may leave is removed by the next open.
    Used by ``--retry-errors`` and ``compact``."""
    directory = os.path.dirname(os.path.abspath(path))
    info = os.fstat(handle.fileno())
    temp = os.path.join(directory, f"{temp_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}.tmp")
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, 0o600)
    except OSError as exc:
        raise SinkError(f"cannot rewrite {path}: no new file in its folder ({exc.strerror or exc})") from None
    new = open(fd, "ab+", buffering=0)  # noqa: SIM115 - becomes the sink's handle
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fchmod(fd, stat.S_IMODE(info.st_mode))
        with contextlib.suppress(OSError):  # only root may give a file away
            os.fchown(fd, info.st_uid, info.st_gid)
        copy(handle.fileno(), fd)
        pause_at("rewrite-copied")
        os.fsync(fd)
        os.replace(temp, path)
        pause_at("rewrite-renamed")
        fsync_directory(directory)
    except BaseException as exc:
        new.close()
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise SinkError(f"cannot rewrite {path}: {exc.strerror or exc}") from None
        raise
    handle.close()
    return new


PAUSE_ENV = "BATCHTAG_TEST_PAUSE_AT"


def pause_at(point: str) -> None:
    """A test hook: with ``BATCHTAG_TEST_PAUSE_AT=point`` the process stops itself (SIGSTOP)
    here, a state the test sees in /proc and then SIGKILLs (tests/test_compact.py)."""
    if os.environ.get(PAUSE_ENV) == point:
        os.kill(os.getpid(), signal.SIGSTOP)


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultSink:
    """Appends records to OUT; open with ``open_sink``.

    Writes run in the sink's own thread, never queued behind file reads or image decoding
    in the shared pool: on Ctrl-C the finished records go out at once.
    """

    def __init__(self, path: str, handle: BinaryIO, writer: Writer | None = None) -> None:
        self.path = path
        self._handle = handle
        self._writer = writer or OsWriter()
        self._last_fsync = time.monotonic()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchtag-sink")
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
            await asyncio.get_running_loop().run_in_executor(
                self._thread, self._write_through, b"".join(lines)
            )
        except OSError as exc:
            raise SinkError(f"cannot write {self.path}: {exc.strerror or exc}") from None
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
        return parse_record(b"".join(chunks))

    def _write_through(self, data: bytes) -> None:
        fd = self._handle.fileno()
        write_all(fd, data, self._writer)
        if time.monotonic() - self._last_fsync >= FSYNC_INTERVAL_S:
            self._writer.fsync(fd)
            self._last_fsync = time.monotonic()

    async def close(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._thread, self._writer.fsync, self._handle.fileno()
            )
        except OSError as exc:
            log.warning("fsync of %s failed: %s", self.path, exc.strerror or exc)
        finally:
            self._handle.close()
            self._thread.shutdown(wait=False)


def refuse_out_among_sources(path: str, sources: list[str]) -> None:
    """OUT given again as a SOURCE (``batchtag run *.jsonl -o tags.jsonl``, run twice) would
    read its own records as a manifest while appending to it, without end."""
    try:
        out = os.stat(path)
    except OSError:
        return
    for source in sources:
        try:
            info = os.fstat(0) if source == "-" else os.stat(source)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == (out.st_dev, out.st_ino):
            name = "standard input" if source == "-" else source
            raise SinkError(f"OUT {path} is also a SOURCE ({name}); give -o another file")


def open_sink(
    path: str,
    retry_errors: bool = False,
    stop: threading.Event | None = None,
    settings: Settings | None = None,
    writer: Writer | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> tuple[ResultSink, Checkpoint]:
    """Lock OUT, check it is ours, repair a torn tail, with ``retry_errors`` drop the error
    records, read the checkpoint (errors that may pass are done again by resume).

    Blocking (a million records take seconds): run it in a thread, and set ``stop`` to
    abandon the checkpoint scan (it raises ``resume.ScanStopped``, OUT is closed).
    """
    if os.path.exists(path) and not os.path.isfile(path):
        kind = "Is a directory" if os.path.isdir(path) else "not a regular file"
        raise SinkError(f"cannot use {path}: {kind} (OUT is appended to and read back as the checkpoint)")
    handle = open_locked(path)
    try:
        refuse_what_is_not_ours(handle, path)
        torn = repair_torn_tail(handle, path)
        if torn:
            log.warning("%s ended with a torn record (%d bytes, from a crash); cut it off", path, torn)
        remove_stale_temps(path)
        dropped = KeySet()
        if retry_errors:
            handle, dropped = rewrite_without_errors(path, handle)
            if dropped:
                log.info(
                    "--retry-errors: %d error records removed from %s, to be done again", len(dropped), path
                )
        checkpoint = read_checkpoint(path, stop, settings, max_attempts)
        handle, compacted = compact_if_due(path, handle, checkpoint)
        if compacted:
            checkpoint = read_checkpoint(path, stop, settings, max_attempts)
            checkpoint.compacted = compacted
        checkpoint.torn_bytes = torn
        checkpoint.retried_errors = dropped
    except BaseException:
        handle.close()
        raise
    if checkpoint.bad_lines:
        shown = ", ".join(map(str, checkpoint.bad_line_numbers))
        more = ", ..." if checkpoint.bad_lines > len(checkpoint.bad_line_numbers) else ""
        log.warning(
            "%s: %d line(s) are not complete records (line %s%s); kept as they are, their items "
            "will be done again",
            path,
            checkpoint.bad_lines,
            shown,
            more,
        )
    return ResultSink(path, handle, writer), checkpoint


AUTO_SHARE = 0.5  # superseded record lines over all record lines, above which a run compacts
AUTO_MIN_SUPERSEDED = 1_000  # below this many, the rewrite is not worth a second scan


def should_compact(checkpoint: Checkpoint) -> bool:
    """Whether a run compacts OUT before it starts (see ``AUTO_SHARE``)."""
    superseded = checkpoint.lines - checkpoint.records
    return superseded >= AUTO_MIN_SUPERSEDED and superseded > AUTO_SHARE * checkpoint.lines


def compact_if_due(path: str, handle: BinaryIO, checkpoint: Checkpoint) -> tuple[BinaryIO, int]:
    """At the start of a run (OUT open and locked as ``handle``): compact when due. Returns
    the handle to go on with and how many superseded records went (when any did, the
    checkpoint must be read again: offsets moved)."""
    if not should_compact(checkpoint):
        return handle, 0
    superseded = checkpoint.lines - checkpoint.records
    handle = rewrite_out(path, handle, lambda source, target: copy_valid_lines(path, source, target))
    log.info("%s: compacted, %d superseded records removed", path, superseded)
    return handle, superseded


def open_locked(path: str) -> BinaryIO:
    """OUT opened for appending and locked, and still the file at ``path`` once locked: a
    run that opened OUT just before another's --retry-errors rename would otherwise lock
    the old, deleted file and write its records there."""
    for _ in range(LOCK_TRIES):
        try:
            handle = open(path, "ab+", buffering=0)  # noqa: SIM115 - owned by ResultSink
        except OSError as exc:
            raise SinkError(f"cannot open {path}: {exc.strerror or exc}") from None
        try:
            lock(handle, path)
            if is_at_path(handle, path):
                return handle
        except BaseException:
            handle.close()
            raise
        handle.close()
    raise SinkError(f"{path} keeps being replaced by another program; try again")


def is_at_path(handle: BinaryIO, path: str) -> bool:
    try:
        here = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(handle.fileno())
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def lock(handle: BinaryIO, path: str) -> None:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SinkError(f"{path} is in use by another batchtag run") from None
