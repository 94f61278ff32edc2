"""The result record: one JSON object a line in OUT. The only code that knows the line
layout: it writes lines, reads them back whole (``iter_valid_records``, ``load_records``)
and reads just what resume needs, fast (``scan_lines``).

``key`` is always written first, then ``source`` and ``status``, so resume can read keys
without parsing whole records; a record's ``file`` facts and ``settings`` are always its
last two fields, so resume finds them from the end of the line (``scan_lines``).

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
from typing import Any, Literal

import numpy as np
import xxhash

from batchtag import codes
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
STATUS_ERROR = (b'file","status":"error"', b'url","status":"error"')
# An ok record in our layout: the status, then the code (the fields ``parse_record`` needs).
STATUS_OK_CODE = (b'file","status":"ok","code":', b'url","status":"ok","code":')
URL_OK_CODE = STATUS_OK_CODE[1]


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
    else); ``scan_lines`` computes the same from a record's bytes."""
    if size is None or mtime_ns is None:
        return key_fp
    return xxhash.xxh3_64_intdigest(state_bytes(size, mtime_ns), seed=key_fp)


def scan_lines(
    lines: Iterable[bytes],
    settings: Settings | None,
    on_bad_line: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
    check_every: int = 65_536,
) -> LineScan:
    """One pass over OUT's lines, reading only what resume needs, straight from the bytes.

    Only complete records count: a line cut short or holding two records is reported to
    ``on_bad_line`` and left out, so its item is done again. This loop is the whole cost
    of resuming a million records, so the common line (our layout, no escapes in the
    key, status ok, the current settings) is handled inline. ``settings``
    None means "any settings are the same". Gives up (``stopped``) soon after ``stop`` is
    set, checking every ``check_every`` lines.
    """
    scan = LineScan()
    keys, states, flags = scan.keys, scan.states, scan.flags
    tail = settings.line_tail() if settings else None
    tail_len = len(tail) if tail else 0
    start, start_len, key_end, end_len = KEY_START, len(KEY_START), KEY_END, len(KEY_END)
    fact_skip, hash_skip = len(FILE_OPEN), len(HASH_FIELD)
    xxh3, add_key, add_state, add_flag = xxhash.xxh3_64_intdigest, keys.append, states.append, flags.append
    settling_flag = SETTLING_FLAG
    position = 0
    for number, line in enumerate(lines, start=1):
        line_at = position
        position += len(line)
        if stop is not None and number % check_every == 0 and stop.is_set():
            scan.stopped = True
            break
        # The commonest line of a URL run's OUT: an ok URL record with the current settings,
        # its key unescaped. What the general path below decides for it, in a fifth fewer
        # steps (no file facts: its state is its key; flag 0: same settings, not an error).
        if tail is not None and line.endswith(tail) and line.startswith(start):
            end = line.find(key_end, start_len)
            if end > 0 and line.startswith(URL_OK_CODE, end + end_len):
                key = line[start_len:end]
                if b"\\" not in key and line.find(start, 1) < 0:
                    key_fp = xxh3(key)
                    add_key(key_fp)
                    add_state(key_fp)
                    add_flag(SAME_SETTINGS * 4)
                    continue
        end = line.find(key_end, start_len) if line.startswith(start) else -1
        key = line[start_len:end] if end > 0 else b"\\"
        transient = settling = False
        # A line that ends with the current settings' tail ends with its record's own
        # closing brace (``"settings"`` cannot occur inside a string), so only a line
        # without it (the rare case) pays for the brace count of ``looks_complete``.
        same_tail = tail is not None and line.endswith(tail)
        if (  # an ok record with its code in our layout, complete
            b"\\" not in key
            and line.startswith(STATUS_OK_CODE, end + end_len)
            and ((same_tail and line.find(start, 1) < 0) or looks_complete(line))
        ):
            is_error = False
            is_file = line.startswith(b"f", end + end_len)  # "file", not "url": facts to read
        else:  # escaped keys, error records, anything odd: decided by the full parse
            record = parse_record(line) if line.endswith(b"\n") else None
            if record is None:  # cut short, two records run together, not a record
                if on_bad_line is not None:
                    on_bad_line(number)
                continue
            key = key_bytes(record.key)
            is_error = not record.ok
            transient, settling = retry_flags(record)
            if settling:
                scan.settling_lines.append(len(keys))
                scan.settling_runs.append(min(255, run_attempts(record)))
            is_file = record.source == "file"
        key_fp = xxhash.xxh3_64_intdigest(key)  # = keyset.fingerprint_bytes, inline for speed
        if same_tail:
            relation, facts_end = SAME_SETTINGS, len(line) - tail_len
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
            state_end = facts_end - 2 - HASH_HEX - hash_skip if has_hash else facts_end - 1
            state_fp = xxhash.xxh3_64_intdigest(line[facts_at + fact_skip : state_end], seed=key_fp)
            if has_hash and not is_error and relation == SAME_SETTINGS:
                scan.content.append(int(line[facts_end - 2 - HASH_HEX : facts_end - 2 - HASH_HEX // 2], 16))
                scan.content_offsets.append(line_at)
        keys.append(key_fp)
        states.append(state_fp)
        flags.append(relation * 4 + transient * 2 + is_error + settling * settling_flag)
    return scan


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
