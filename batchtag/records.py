"""The result record: one JSON object a line in OUT. The only code that knows the line
layout: it writes lines, reads them back whole (``iter_valid_records``, ``load_records``)
and reads just their keys and status fast for resume (``iter_keys_and_status``).

``key`` is always written first, then ``source`` and ``status``, so resume can read keys
without parsing whole records.
"""

from __future__ import annotations

import json
import logging
import re
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from batchtag import codes
from batchtag.errors import UsageError
from batchtag.keyset import fingerprint

log = logging.getLogger("batchtag")

Status = Literal["ok", "error"]
SourceKind = Literal["file", "url"]

KEY_PREFIX = '{"key":'
# Right after the key: the source and status fields, in the order ``to_line`` writes them.
_STATUS_AFTER_KEY = re.compile(r',"source":"(?:file|url)","status":"(ok|error)"')


@dataclass
class Record:
    key: str
    source: SourceKind
    status: Status
    code: int
    message: str
    tags: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. "resized", "elapsed_ms"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        head = {
            "key": self.key,
            "source": self.source,
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "tags": self.tags,
            "attempts": self.attempts,
        }
        return {**head, **self.extra}

    def to_line(self) -> bytes:
        """UTF-8 JSON plus newline. Paths that are not valid UTF-8 (surrogate escapes) are
        written as JSON ``\\udcXX`` escapes, so the file stays valid UTF-8 and reads back to
        the same key."""
        text = json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8", "backslashreplace") + b"\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        known = ("key", "source", "status", "code", "message", "tags", "attempts")
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**{k: data[k] for k in known if k in data}, extra=extra)


class ItemLike(Protocol):
    """What a record needs of an item (``sources.Item``)."""

    @property
    def key(self) -> str: ...
    @property
    def kind(self) -> SourceKind: ...


class AnswerLike(Protocol):
    """What a record needs of the API's answer (``client.Answer``)."""

    code: int
    message: str
    tags: list[dict[str, Any]]
    attempts: int


def result_record(item: ItemLike, answer: AnswerLike, notes: dict[str, Any], elapsed_ms: int) -> Record:
    """The record of an item the API answered (after retries): ok, or its last failure."""
    status: Status = "ok" if answer.code == codes.OK else "error"
    extra = {**notes, "elapsed_ms": elapsed_ms}
    return Record(
        item.key, item.kind, status, answer.code, answer.message, answer.tags, answer.attempts, extra
    )


def error_record(item: ItemLike, code: int, message: str) -> Record:
    """The record of an item that failed before any request (bad input, bad manifest line)."""
    return Record(item.key, item.kind, "error", code, message, [], 0)


def internal_error_record(item: ItemLike, exc: BaseException) -> Record:
    """A bug costs one item, not the run: logged with its traceback, recorded without it."""
    log.error("internal error on %s", item.key, exc_info=exc)
    return error_record(item, codes.CLIENT_INTERNAL_ERROR, f"internal error: {type(exc).__name__}")


KEY_START = b'{"key":"'
KEY_END = b'","source":"'
STATUS_ERROR = (b'file","status":"error"', b'url","status":"error"')


def read_key_bytes_and_status(line: bytes) -> tuple[bytes, Status | None]:
    """The key's UTF-8 bytes and the status, straight from the bytes of a line.

    In our layout a key without backslashes is written as its UTF-8 bytes verbatim between
    ``{"key":"`` and ``","source":"`` (an unescaped quote cannot occur inside the string),
    so most lines need no decoding at all; the rest take the general path.
    """
    if line.startswith(KEY_START):
        end = line.find(KEY_END, len(KEY_START))
        if end > 0 and b"\\" not in line[len(KEY_START) : end]:
            status_at = end + len(KEY_END)
            status: Status = "error" if line.startswith(STATUS_ERROR, status_at) else "ok"
            return line[len(KEY_START) : end], status
    key, status_text = read_key_and_status(line.decode("utf-8", "surrogateescape"))
    return key.encode("utf-8", "surrogatepass"), status_text


def read_key_and_status(line: str) -> tuple[str, Status | None]:
    """The key (and status) of a record line without decoding the whole object.

    A million-record resume spends its time here; decoding one JSON string is several
    times cheaper than ``json.loads`` of the record. Lines not in our layout fall back to
    a full parse. Raises ValueError for a line that is not a record.
    """
    if line.startswith(KEY_PREFIX + '"'):
        key, end = json.decoder.scanstring(line, len(KEY_PREFIX) + 1)
        match = _STATUS_AFTER_KEY.match(line, end)
        if match:
            return key, match.group(1)  # type: ignore[return-value]
    data = json.loads(line)
    if not isinstance(data, dict) or not isinstance(data.get("key"), str):
        raise ValueError("not a batchtag record")
    return data["key"], data.get("status")


def iter_keys_and_status(
    lines: Iterable[bytes], on_bad_line: Callable[[int], None] | None = None
) -> Iterator[tuple[bytes, bool]]:
    """(key as UTF-8 bytes, is it an error) for each record line; ``on_bad_line(number)``
    for a line that is not a record.

    This loop is the whole cost of resuming a million records, so the common line (our
    layout, no escapes in the key: see ``read_key_bytes_and_status``) is handled inline.
    """
    start, start_len, key_end, end_len = KEY_START, len(KEY_START), KEY_END, len(KEY_END)
    for number, line in enumerate(lines, start=1):
        end = line.find(key_end, start_len) if line.startswith(start) else -1
        key = line[start_len:end] if end > 0 else b"\\"
        if b"\\" in key:
            try:
                key, status = read_key_bytes_and_status(line)
            except ValueError:
                if on_bad_line is not None:
                    on_bad_line(number)
                continue
            yield key, status == "error"
        else:
            yield key, line.startswith(STATUS_ERROR, end + end_len)


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "key": str,
    "source": str,
    "status": str,
    "code": int,
    "message": str,
    "tags": list,
    "attempts": int,
}
_REQUIRED = ("key", "source", "status", "code", "message")


def parse_record(line: bytes | str) -> Record | None:
    """The record on one line of OUT, or None when the line is not a valid record (broken
    JSON, a missing field, a field of the wrong type)."""
    try:
        data = json.loads(line)
    except ValueError:  # includes undecodable bytes
        return None
    if not isinstance(data, dict) or any(name not in data for name in _REQUIRED):
        return None
    for name, kind in _FIELD_TYPES.items():
        if name in data and (not isinstance(data[name], kind) or isinstance(data[name], bool)):
            return None
    if data["status"] not in ("ok", "error"):
        return None
    return Record.from_dict(data)


def iter_valid_records(path: str, on_count: Callable[[int], None] | None = None) -> Iterator[Record]:
    """Exactly one valid record per key from OUT, in file order: complete lines only (a
    torn last line is skipped), broken lines skipped, and when a key has several records
    the last complete one wins.

    Two passes, so memory stays at 16 bytes a line however large OUT is: the first finds
    each key's last valid line (by 8-byte fingerprint), the second yields those lines.
    ``on_count`` hears, between the passes, how many records will come (a progress total).
    """
    numbers = array("Q")
    fingerprints = array("Q")
    total = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle):
            total = number + 1
            record = parse_record(line) if line.endswith(b"\n") else None
            if record is not None:
                numbers.append(number)
                fingerprints.append(fingerprint(record.key))
    if not numbers:
        if on_count is not None:
            on_count(0)
        return
    # np.unique on the reversed arrays keeps each fingerprint's first index there: its last here.
    reversed_fps = np.frombuffer(fingerprints, dtype=np.uint64)[::-1]
    _, first_in_reversed = np.unique(reversed_fps, return_index=True)
    winners = np.zeros(total, dtype=bool)
    winners[np.frombuffer(numbers, dtype=np.uint64)[::-1][first_in_reversed]] = True
    if on_count is not None:
        on_count(len(first_in_reversed))
    with open(path, "rb") as handle:
        for number, line in enumerate(handle):
            if number < total and winners[number]:
                record = parse_record(line)
                if record is not None:  # unchanged since the first pass unless OUT was edited
                    yield record


class NotAResultsFile(UsageError):
    """A file given as OUT that does not start with a batchtag record."""


def check_results_file(path: str) -> None:
    """Readers that take OUT from a user call this first: an empty file is fine, a file
    whose first line is not a record (a photo, someone's notes) is NotAResultsFile, and a
    missing or unreadable one raises OSError."""
    with open(path, "rb") as handle:
        first = handle.readline(1 << 20)  # a photo given by mistake has no newline to stop at
    if not first:
        return
    try:
        read_key_bytes_and_status(first)  # the first line may be torn, but its key reads
    except ValueError:
        raise NotAResultsFile(f"{path} is not a batchtag results file") from None


def load_records(path: str) -> list[dict[str, Any]]:
    """Every record line of OUT as a dict, for tests and small tools (not for million-line
    files): unlike ``iter_valid_records`` it hides nothing, so a repeated key shows."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
