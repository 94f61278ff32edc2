"""The result record: one JSON object a line in OUT, the record schema's only home.

``key`` is always written first so resume can read keys without parsing whole records
(see ``sink.read_checkpoint``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

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
