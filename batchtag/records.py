"""The result record: one JSON object a line in OUT. The only code that knows the line
layout: it writes lines, reads them back whole (``iter_valid_records``, ``load_records``)
and reads just what resume needs, fast (``scan_blocks``).

``key`` is always written first, then ``source`` and ``status``, so resume can read keys
without parsing whole records; a record's ``file`` facts and ``settings`` are always its
last two fields, so resume finds them from the end of the line (``scan_blocks``).

OUT may hold several records for one key (a changed file tagged again, ``--retag``): the
last complete one is valid. ``iter_valid_records`` is how every reader sees OUT. A line counts
only when it is a complete record: resume and readers agree on which items are done.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

import numpy as np
import xxhash

from batchtag import codes
from batchtag.keyset import fingerprint, fingerprints_bytes

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
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. "resized", "elapsed_ms", "reused"
    file: FileFacts | None = None  # what a file item was made from
    settings: Settings | None = None  # what shaped the tags

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
        tail: dict[str, Any] = {}
        if self.file is not None:
            tail["file"] = self.file.to_dict()
        if self.settings is not None:
            tail["settings"] = self.settings.to_dict()
        return {**head, **self.extra, **tail}

    def to_line(self) -> bytes:
        """UTF-8 JSON plus newline. Paths that are not valid UTF-8 (surrogate escapes) are
        written as JSON ``\\udcXX`` escapes, so the file stays valid UTF-8 and reads back to
        the same key."""
        return LINE_ENCODER.encode(self.to_dict()).encode("utf-8", "backslashreplace") + b"\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        known = ("key", "source", "status", "code", "message", "tags", "attempts")
        extra = {k: v for k, v in data.items() if k not in known}
        # Objects in our shape become FileFacts/Settings; anything else stays in extra as it is.
        facts = FileFacts.from_dict(extra["file"]) if "file" in extra else None
        settings = Settings.from_dict(extra["settings"]) if "settings" in extra else None
        if facts is not None:
            del extra["file"]
        if settings is not None:
            del extra["settings"]
        return cls(**{k: data[k] for k in known if k in data}, extra=extra, file=facts, settings=settings)


@dataclass(frozen=True, slots=True)
class FileFacts:
    """What a file's record was made from. ``mtime_ns`` is integer nanoseconds
    (``st_mtime_ns``), exact where a float would round; ``xxh3_128`` is the hex XXH3-128
    of the file's bytes as read (None when they could not be read)."""

    size: int
    mtime_ns: int
    xxh3_128: str | None = None
    more: dict[str, Any] | None = None  # fields another writer put in the object: kept

    def to_dict(self) -> dict[str, Any]:
        # Others' fields first: ours end the object, where resume reads them.
        facts: dict[str, Any] = {**(self.more or {}), "size": self.size, "mtime_ns": self.mtime_ns}
        if self.xxh3_128 is not None:
            facts["xxh3_128"] = self.xxh3_128
        return facts

    @classmethod
    def from_dict(cls, data: Any) -> FileFacts | None:
        """Facts from a record's ``file`` object; None when it is not in our shape."""
        if not isinstance(data, dict):
            return None
        size, mtime_ns, digest = data.get("size"), data.get("mtime_ns"), data.get("xxh3_128")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, mtime_ns)):
            return None
        if digest is not None and not isinstance(digest, str):
            return None
        more = {k: v for k, v in data.items() if k not in ("size", "mtime_ns", "xxh3_128")}
        return cls(size, mtime_ns, digest, more or None)

    def state_bytes(self) -> bytes:
        return state_bytes(self.size, self.mtime_ns)


def state_bytes(size: int, mtime_ns: int) -> bytes:
    """The size and mtime exactly as they appear inside a record's ``file`` object: resume
    compares a file's stat with its record by fingerprinting these bytes on both sides."""
    return b'"size":%d,"mtime_ns":%d' % (size, mtime_ns)


def content_fingerprint(hex_digest: str) -> int:
    """The first 64 bits of a content hash, as the checkpoint's content index keeps them."""
    return int(hex_digest[:16], 16)


def content_hash(data: bytes) -> str:
    """XXH3-128 of the bytes read for sending: 12-16 GB/s here, about 6x BLAKE3 (single
    thread); it finds copies in one's own archive, not adversarial collisions."""
    return xxhash.xxh3_128_hexdigest(data)


@dataclass(frozen=True, slots=True)
class Settings:
    """The settings that shape tags. ``tagger`` and ``lang`` are the embedded tagger's and
    are None for a remote endpoint, whose own model and language the client cannot see;
    ``model`` says what the embedded model tagger does otherwise than its default (other
    stages, the float classifier) and is None, and left out of the line, for the default."""

    endpoint: str
    tagger: str | None = None
    lang: str | None = None
    model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"endpoint": self.endpoint}
        for name in ("tagger", "lang", "model"):
            if (value := getattr(self, name)) is not None:
                data[name] = value
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Settings | None:
        """Settings from a record's ``settings`` object; None when it is not in our shape."""
        if not isinstance(data, dict) or set(data) - {"endpoint", "tagger", "lang", "model"}:
            return None
        values = (data.get("endpoint"), data.get("tagger"), data.get("lang"), data.get("model"))
        if not isinstance(values[0], str) or not all(v is None or isinstance(v, str) for v in values[1:]):
            return None
        return cls(*values)

    def describe(self) -> str:
        return ", ".join(f"{name} {value}" for name, value in self.to_dict().items())

    def line_tail(self) -> bytes:
        """How every line written with these settings ends: resume recognises records made
        with the current settings by this suffix alone."""
        text = LINE_ENCODER.encode(self.to_dict())
        return SETTINGS_OPEN + text.encode("utf-8", "backslashreplace") + b"}\n"


# One encoder for every line (json.dumps with options builds a new one each call).
LINE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
SETTINGS_OPEN = b',"settings":'
FILE_OPEN = b',"file":{'
HASH_FIELD = b',"xxh3_128":"'


KEY_START = b'{"key":"'
KEY_END = b'","source":"'
# An ok record in our layout: the status, then the code (the fields ``parse_record`` needs).
STATUS_OK_CODE = (b'file","status":"ok","code":', b'url","status":"ok","code":')


def _plain_head(source: bytes, status: bytes) -> bytes:
    """A regular expression for the start of a line in our layout whose key is written as
    its UTF-8 bytes verbatim (nothing to unescape: no quote, backslash or newline), the
    key as group 1. The one description of that layout for every fast reader."""
    return (
        re.escape(KEY_START)
        + rb'([^"\\\n]*)'
        + re.escape(KEY_END)
        + source
        + rb'","status":"'
        + status
        + rb'"'
    )


# The key and status of any line in our layout with a plain key (``read_key_bytes_and_status``).
PLAIN_HEAD = re.compile(_plain_head(rb"(?:file|url)", rb"(ok|error)"))
# An ok URL record's head with its code (the fields ``parse_record`` needs before the rest).
_URL_OK_HEAD = _plain_head(rb"url", rb"ok") + rb',"code":'


def read_key_bytes_and_status(line: bytes) -> tuple[bytes, Status | None]:
    """The key's UTF-8 bytes and the status, straight from the bytes of a line.

    In our layout a key without backslashes is written as its UTF-8 bytes verbatim between
    ``{"key":"`` and ``","source":"`` (an unescaped quote cannot occur inside the string),
    so most lines need no decoding at all (``PLAIN_HEAD``); the rest take the general path.
    """
    if match := PLAIN_HEAD.match(line):
        return match[1], match[2].decode()  # type: ignore[return-value]
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


def looks_complete(line: bytes) -> bool:
    """The cheap test resume applies to every line: a line our writer wrote whole starts
    with ``{"key":"``, holds no second record, ends with ``}`` and a newline, and closes
    every brace it opens.

    A record cut by a crash and followed by more output fails it (its top-level brace is
    still open, or a second ``{"key":"`` follows on the same line); ``{"key":"`` cannot
    occur inside a JSON string, where quotes are escaped. Braces inside strings (a file
    name with ``{``) can make a complete line fail it, never pass: such lines go to
    ``parse_record``, which decides exactly. What it cannot see is a cut line whose
    strings hold exactly the closing braces the cut removed.
    """
    return (
        line.startswith(KEY_START)
        and line.endswith(b"}\n")
        and line.find(KEY_START, 1) < 0
        and line.count(b"{") == line.count(b"}")
    )


def key_bytes(key: str) -> bytes:
    """A key as the bytes its fingerprint is taken of (surrogate escapes passed through)."""
    return key.encode("utf-8", "surrogatepass")


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
    JSON, a missing field, a field or a tag of the wrong type)."""
    try:
        data = json.loads(line)
    except ValueError:  # includes undecodable bytes
        return None
    if not isinstance(data, dict) or any(name not in data for name in _REQUIRED):
        return None
    for name, kind in _FIELD_TYPES.items():
        if name in data and (not isinstance(data[name], kind) or isinstance(data[name], bool)):
            return None
    if data["status"] not in ("ok", "error") or not all(map(_is_tag, data.get("tags", ()))):
        return None
    return Record.from_dict(data)


def _is_tag(tag: Any) -> bool:
    """A tag in our shape: what every reader (export, report) may index without checking.
    A crafted OUT with ``{"tag_name": 5}`` is a broken line, not a traceback later."""
    return (
        isinstance(tag, dict)
        and isinstance(tag.get("tag_name"), str)
        and isinstance(tag.get("tag_confidence"), int)
        and not isinstance(tag["tag_confidence"], bool)
    )


def valid_line_mask(path: str) -> np.ndarray:
    """For each line of OUT, whether it is the valid record of its key: a complete, valid
    record line and the last such line for its key. 16 bytes a line while it runs."""
    return record_line_masks(path)[0]


def record_line_masks(path: str) -> tuple[np.ndarray, np.ndarray]:
    """For each line of OUT: whether it is its key's valid record (``valid_line_mask``), and
    whether it is a complete, valid record at all (the rest are kept by every rewrite)."""
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
    winners = np.zeros(total, dtype=bool)
    is_record = np.zeros(total, dtype=bool)
    if numbers:
        # np.unique on the reversed arrays keeps each fingerprint's first index there: its last here.
        reversed_fps = np.frombuffer(fingerprints, dtype=np.uint64)[::-1]
        _, first_in_reversed = np.unique(reversed_fps, return_index=True)
        winners[np.frombuffer(numbers, dtype=np.uint64)[::-1][first_in_reversed]] = True
        is_record[np.frombuffer(numbers, dtype=np.uint64)] = True
    return winners, is_record


def iter_valid_records(path: str, on_count: Callable[[int], None] | None = None) -> Iterator[Record]:
    """Exactly one valid record per key from OUT, in file order: complete lines only (a
    torn last line is skipped), broken lines skipped, and when a key has several records
    the last complete one wins.

    Two passes, so memory stays at 16 bytes a line however large OUT is: the first finds
    each key's last valid line (by 8-byte fingerprint), the second yields those lines.
    ``on_count`` hears, between the passes, how many records will come (a progress total).
    """
    winners = valid_line_mask(path)
    if on_count is not None:
        on_count(int(winners.sum()))
    if not winners.any():
        return
    total = len(winners)
    with open(path, "rb") as handle:
        for number, line in enumerate(handle):
            if number < total and winners[number]:
                record = parse_record(line)
                if record is not None:  # unchanged since the first pass unless OUT was edited
                    yield record


# --- the resume scan: key, status, file facts and settings of every line, from its bytes ------

HASH_HEX = 32
# A line's relation to the run's settings.
SAME_SETTINGS, OTHER_SETTINGS, NO_SETTINGS = 0, 1, 2


@dataclass
class LineScan:
    """Per line of OUT (in order): key fingerprint, state fingerprint (key plus size and
    mtime, see ``state_fingerprint``), relation to the settings * 4 + is_transient_error * 2
    + is_error (broken lines are not in them at all); and for ok
    lines made with the same settings and carrying a content hash, its first 64 bits and
    the line's byte offset."""

    keys: array = field(default_factory=lambda: array("Q"))
    states: array = field(default_factory=lambda: array("Q"))
    flags: bytearray = field(default_factory=bytearray)
    content: array = field(default_factory=lambda: array("Q"))
    content_offsets: array = field(default_factory=lambda: array("q"))
    other_settings_line: bytes | None = None  # the first line with tags made otherwise
    # Error lines whose failure settles (codes.Retry.SETTLES): their index in ``keys`` and
    # how many runs have tried their key (``run_attempts``, capped at 255).
    settling_lines: array = field(default_factory=lambda: array("Q"))
    settling_runs: array = field(default_factory=lambda: array("B"))
    stopped: bool = False  # abandoned because ``stop`` was set


def state_fingerprint(key_fp: int, size: int | None, mtime_ns: int | None) -> int:
    """What resume compares for a file with a stat (its key's fingerprint for anything
    else); ``scan_blocks`` computes the same from a record's bytes."""
    if size is None or mtime_ns is None:
        return key_fp
    return xxhash.xxh3_64_intdigest(state_bytes(size, mtime_ns), seed=key_fp)


NEWLINE = ord("\n")
SCAN_BLOCK = 1 << 21  # bytes of OUT scanned at a time, whole lines (2 MiB: ~8,000 records)


def read_blocks(handle: BinaryIO, size: int = SCAN_BLOCK, line_ends: bytes = b"\n") -> Iterator[bytes]:
    """A file in blocks of whole lines, each ending with one of ``line_ends`` (bytes);
    only the last may not (a file that ends in a torn line). A million lines one Python
    call each is most of a resume's time; a block is searched and counted by C loops."""
    rest = b""
    while chunk := handle.read(size):
        if rest:
            chunk, rest = rest + chunk, b""
        cut = max(chunk.rfind(end) for end in line_ends) + 1
        if cut < len(chunk):
            chunk, rest = chunk[:cut], chunk[cut:]
        if chunk:
            yield chunk
    if rest:
        yield rest


def scan_blocks(
    blocks: Iterable[bytes],
    settings: Settings | None,
    on_bad_line: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> LineScan:
    """One pass over OUT (``read_blocks``), reading only what resume needs, straight from
    the bytes.

    Only complete records count: a line cut short or holding two records is reported to
    ``on_bad_line`` (its line number) and left out, so its item is done again. This is
    the whole cost of resuming a million records, so the commonest line, an ok URL record
    with the current settings and a plain key, is found a block at a time by one regular
    expression (``_BlockScanner``); every other line takes the general path, a line at a
    time. ``settings`` None means "any settings are the same". Gives up (``stopped``) at
    the next block once ``stop`` is set.
    """
    scanner = _BlockScanner(settings, on_bad_line)
    for block in blocks:
        if stop is not None and stop.is_set():
            scanner.scan.stopped = True
            break
        scanner.block(block)
    return scanner.scan


class _BlockScanner:
    """``scan_blocks``' state: the scan so far, the line count and byte offset reached."""

    def __init__(self, settings: Settings | None, on_bad_line: Callable[[int], None] | None) -> None:
        self.scan = LineScan()
        self.tail = settings.line_tail() if settings else None
        self.on_bad_line = on_bad_line
        self.number = 0  # lines before the current block
        self.position = 0  # its byte offset in OUT
        self.line_heads: re.Pattern[bytes] | None = None
        self.each_line: re.Pattern[bytes] | None = None
        if self.tail is not None:
            # At every newline: the key of the line after it when that line starts with
            # the head of an ok URL record with a plain key; b"" for any other line.
            self.line_heads = re.compile(rb"\n(?:" + _URL_OK_HEAD + rb"|)")
            # One match a line: the key of an ok URL line with the current settings' tail,
            # b"" for any other line (empty keys too: those take the general path).
            fast = _URL_OK_HEAD + rb"[^\n]*" + re.escape(self.tail[:-1]) + rb"(?=\n)"
            self.each_line = re.compile(rb"(?m)^(?:" + fast + rb"|[^\n]*)")

    def block(self, block: bytes) -> None:
        """Scan one block of whole lines (``read_blocks``)."""
        lines = self._whole_records(block) or self._mostly_plain(block) or self._general_block(block)
        self.number += lines
        self.position += len(block)

    def _general_block(self, block: bytes) -> int:
        pieces = block.split(b"\n")
        self._general_lines(pieces, range(len(pieces)), self._offsets(pieces))
        return len(pieces) - (not pieces[-1])

    def _whole_records(self, block: bytes) -> int:
        """A block whose lines each hold one record (the usual OUT): every line starts
        with ``{"key":"`` and none holds a second one (as many as lines). Its ok URL lines
        with a plain key and the current settings are known by their head (one regular
        expression finds them all) and their tail (as many tails as newlines: each ends
        one line; else compared line by line in one numpy step); the other lines (errors,
        files, other settings, ...) take the general path in their place."""
        if self.line_heads is None or self.tail is None or not block.endswith(b"\n"):
            return 0
        data = np.frombuffer(block, dtype=np.uint8)
        ends = np.flatnonzero(data == NEWLINE)
        starts = np.empty(len(ends), dtype=np.int64)
        starts[0], starts[1:] = 0, ends[:-1] + 1
        if int((ends - starts).min()) < len(KEY_START) + len(self.tail):
            return 0
        if not (_bytes_at(data, starts, len(KEY_START)) == np.frombuffer(KEY_START, dtype=np.uint8)).all():
            return 0
        lines = len(ends)
        if block.count(KEY_START) != lines:
            return 0
        keys = self.line_heads.findall(b"\n" + block)
        if len(keys) != lines + 1:
            return 0
        keys.pop()  # the block's last newline: no line after it
        fps = fingerprints_bytes(keys)
        others = np.empty(0, dtype=np.int64)
        if not all(keys):
            others = np.flatnonzero(np.fromiter(map(len, keys), dtype=np.int64, count=lines) == 0)
        if block.count(self.tail) != lines:
            tails = _bytes_at(data, ends + 1 - len(self.tail), len(self.tail))
            same = (tails == np.frombuffer(self.tail, dtype=np.uint8)).all(axis=1)
            others = np.union1d(others, np.flatnonzero(~same))
        done = 0
        for index in others.tolist():
            self._add_plain(fps[done:index])
            line_at = int(starts[index])
            self._general(
                block[line_at : int(ends[index]) + 1], self.position + line_at, self.number + index + 1
            )
            done = index + 1
        self._add_plain(fps[done:])
        return lines

    def _mostly_plain(self, block: bytes) -> int:
        """A block with other lines among them: one match a line says which lines are
        plain; the others take the general path, in their place."""
        if self.each_line is None or not block.endswith(b"\n"):
            return 0
        found = self.each_line.findall(block)
        pieces = block.split(b"\n")
        if len(found) != len(pieces):
            return 0
        lengths = np.fromiter(map(len, found), dtype=np.int64, count=len(found))
        lengths[-1] = 1  # the empty piece after the last newline: no line
        others = np.flatnonzero(lengths == 0)
        # A plain line holds no second record when the ``{"key":"`` are one a plain line
        # plus those of the other lines.
        in_others = sum(pieces[i].count(KEY_START) for i in others.tolist())
        if block.count(KEY_START) != len(found) - 1 - len(others) + in_others:
            return 0
        fps = fingerprints_bytes(found)
        offsets = self._offsets(pieces)
        done = 0
        for index in others.tolist():
            self._add_plain(fps[done:index])
            self._general_lines(pieces, (index,), offsets)
            done = index + 1
        self._add_plain(fps[done : len(found) - 1])
        return len(found) - 1

    def _offsets(self, pieces: list[bytes]) -> np.ndarray:
        """Each piece's byte offset in OUT."""
        offsets = np.empty(len(pieces), dtype=np.int64)
        offsets[0] = self.position
        np.cumsum(
            np.fromiter(map(len, pieces[:-1]), dtype=np.int64, count=len(pieces) - 1) + 1, out=offsets[1:]
        )
        offsets[1:] += self.position
        return offsets

    def _add_plain(self, fps: np.ndarray) -> None:
        """Ok URL lines with the current settings: no file facts, so the state is the key;
        flag 0 (same settings, not an error)."""
        if len(fps):
            data = fps.tobytes()
            self.scan.keys.frombytes(data)
            self.scan.states.frombytes(data)
            self.scan.flags.extend(bytes(len(fps)))

    def _general_lines(self, pieces: list[bytes], indices: Iterable[int], offsets: np.ndarray) -> None:
        """The given pieces of ``block.split(b"\\n")``, a line at a time (each with its
        newline, but a last piece that had none)."""
        last = len(pieces) - 1
        for index in indices:
            piece = pieces[index]
            if index < last:
                self._general(piece + b"\n", int(offsets[index]), self.number + index + 1)
            elif piece:  # a last line without newline: torn
                self._general(piece, int(offsets[index]), self.number + index + 1)

    def _general(self, line: bytes, line_at: int, number: int) -> None:
        """Any line: what resume needs of it, or ``on_bad_line`` when it is no complete
        record."""
        scan, tail = self.scan, self.tail
        start_len = len(KEY_START)
        end = line.find(KEY_END, start_len) if line.startswith(KEY_START) else -1
        key = line[start_len:end] if end > 0 else b"\\"
        transient = settling = False
        # A line that ends with the current settings' tail ends with its record's own
        # closing brace (``"settings"`` cannot occur inside a string), so only a line
        # without it (the rare case) pays for the brace count of ``looks_complete``.
        same_tail = tail is not None and line.endswith(tail)
        if (  # an ok record with its code in our layout, complete
            b"\\" not in key
            and line.startswith(STATUS_OK_CODE, end + len(KEY_END))
            and ((same_tail and line.find(KEY_START, 1) < 0) or looks_complete(line))
        ):
            is_error = False
            is_file = line.startswith(b"f", end + len(KEY_END))  # "file", not "url": facts to read
        else:  # escaped keys, error records, anything odd: decided by the full parse
            record = parse_record(line) if line.endswith(b"\n") else None
            if record is None:  # cut short, two records run together, not a record
                if self.on_bad_line is not None:
                    self.on_bad_line(number)
                return
            key = key_bytes(record.key)
            is_error = not record.ok
            transient, settling = retry_flags(record)
            if settling:
                scan.settling_lines.append(len(scan.keys))
                scan.settling_runs.append(min(255, run_attempts(record)))
            is_file = record.source == "file"
        key_fp = xxhash.xxh3_64_intdigest(key)  # = keyset.fingerprint_bytes, inline for speed
        if same_tail:
            relation, facts_end = SAME_SETTINGS, len(line) - len(tail or b"")
        elif (settings_at := line.rfind(SETTINGS_OPEN)) > 0:
            # Only tags can mix: an error made elsewhere is an error like any other.
            relation = OTHER_SETTINGS if tail is not None and not is_error else SAME_SETTINGS
            facts_end = settings_at
            if relation == OTHER_SETTINGS and scan.other_settings_line is None:
                scan.other_settings_line = line
        else:
            relation, facts_end = NO_SETTINGS, len(line) - 2  # before the closing "}\n"
        state_fp = key_fp
        facts_at = line.rfind(FILE_OPEN, 0, facts_end) if is_file else -1
        if facts_at > 0:  # facts_end is just past the file object's "}"
            has_hash = line[facts_end - 2 : facts_end] == b'"}'
            state_end = facts_end - 2 - HASH_HEX - len(HASH_FIELD) if has_hash else facts_end - 1
            state_fp = xxhash.xxh3_64_intdigest(line[facts_at + len(FILE_OPEN) : state_end], seed=key_fp)
            if has_hash and not is_error and relation == SAME_SETTINGS:
                scan.content.append(int(line[facts_end - 2 - HASH_HEX : facts_end - 2 - HASH_HEX // 2], 16))
                scan.content_offsets.append(line_at)
        scan.keys.append(key_fp)
        scan.states.append(state_fp)
        scan.flags.append(relation * 4 + transient * 2 + is_error + settling * SETTLING_FLAG)


def _bytes_at(data: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """The ``length`` bytes at each of ``starts``, one row each."""
    return data[starts[:, None] + np.arange(length)]


SETTLING_FLAG = 16  # in ``LineScan.flags``: an error whose failure settles
RUN_ATTEMPTS = "run_attempts"  # an error record's field: runs that have tried its key


def run_attempts(record: Record) -> int:
    """How many runs have tried this record's key so far (1 for records without the field)."""
    value = record.extra.get(RUN_ATTEMPTS)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def retry_flags(record: Record) -> tuple[bool, bool]:
    """Whether an error record's failure is transient, and whether it settles."""
    if record.ok:
        return False, False
    status = record.extra.get("http_status")
    status = status if isinstance(status, int) and not isinstance(status, bool) else None
    kind = codes.retry_class(record.code, status)
    return kind is codes.Retry.TRANSIENT, kind is codes.Retry.SETTLES


def load_records(path: str) -> list[dict[str, Any]]:
    """Every record line of OUT as a dict, for tests and small tools (not for million-line
    files): unlike ``iter_valid_records`` it hides nothing, so a repeated key shows."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
