"""Payloads: read an item's image and build the request body, before any request is spent.

Files are read in a worker thread so a slow disk never stalls the event loop, several
in one hop when the queue holds them (``read_images``); batches of small files the walker
sized (``INLINE_READ_BYTES``) are read on the loop, where the read costs less CPU than the
hop. Their content hash is taken from the same bytes at the same time, so the pipeline can
reuse an earlier record for identical bytes before any encoding. Problems the server would only answer
with a permanent error (missing, unreadable, empty, not an image) are caught here and
cost no request or quota. Formats the API does not take are converted and turned images
made upright (``formats``); an image over the API's size limit is downscaled and
re-encoded as JPEG instead of failing with code 20.

Only regular files are read: a FIFO, a device or a socket named ``*.jpg`` (a symlink to
``/dev/zero``, say) gets an error record without being read or blocking, and a file over
``max_file_bytes`` (config ``max-file-bytes``) is refused before a byte is read.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from batchtag import api, codes
from batchtag.config import MAX_FILE_BYTES
from batchtag.decoding import NotRegularFile, OverBudget, open_regular, open_within_budget
from batchtag.errors import InputError
from batchtag.pipeline.formats import needs_work, sendable
from batchtag.pipeline.sources import Item, url_problem
from batchtag.records import FileFacts, content_hash

INLINE_ENCODE_BYTES = 256 * 1024  # bigger images are base64-encoded off the event loop
READ_MORE_BYTES = 1024 * 1024  # a read's size past the size fstat gave (a growing file)
READ_BATCH_FILES = 16  # at most this many files read in one thread hop ...
READ_BATCH_BYTES = 4 * 1024 * 1024  # ... and no more bytes than this (walker sizes)
INLINE_READ_BYTES = 256 * 1024  # a batch the walker sized at most this is read on the event loop
RESIZE_QUALITY = 88


@dataclass
class Payload:
    body: bytes  # the JSON request body, without signature (that goes in a header); b"" when
    # the transport takes the source itself (the embedded tagger): then ``image`` or ``url``
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. "resized", recorded with the result
    facts: FileFacts | None = None  # what the file's record will say it was made from
    image: bytes | None = None
    url: str | None = None


def body_bytes(appid: str, bucket: str, source_field: str, value: bytes) -> bytes:
    """The JSON body, assembled directly: no detour of a 10 MB base64 string through json."""
    return body_head(appid, bucket, source_field) + value + b'"}'


@functools.lru_cache(maxsize=8)
def body_head(appid: str, bucket: str, source_field: str) -> bytes:
    """The body up to the opening quote of the image or url: the same for every request."""
    head = {"appid": appid, "bucket": bucket} if bucket else {"appid": appid}
    return json.dumps(head, separators=(",", ":"))[:-1].encode() + b',"' + source_field.encode() + b'":"'


def with_appid(body: bytes, appid: str, new_appid: str, bucket: str) -> bytes:
    """``body`` (built for ``appid``) for another appid: only the head differs, so an
    endpoint pool sends one encoded image through endpoints with their own appids."""
    if appid == new_appid or not body:
        return body
    for source_field in ("image", "url"):
        head = body_head(appid, bucket, source_field)
        if body.startswith(head):
            return body_head(new_appid, bucket, source_field) + body[len(head) :]
    raise ValueError("body was not built by body_bytes")


def open_regular_file(path: str, flags: int) -> int:
    """An ``opener`` for ``open``: refuses anything but a regular file before opening it
    (opening a FIFO blocks, opening some devices has effects), and opens without blocking."""
    try:
        return open_regular(path, flags)
    except NotRegularFile as exc:
        raise InputError(codes.CLIENT_INPUT_ERROR, f"not a regular file: {exc.kind}") from None


def too_large(size: int, cap: int) -> InputError:
    return InputError(
        codes.CLIENT_INPUT_ERROR,
        f"file too large: {size:,} bytes, over the {cap:,}-byte cap (max-file-bytes)",
    )


def read_file_now(path: str, max_file_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Read a whole file, blocking: callers run it in a worker thread (``read_files``)."""
    try:
        fd = open_regular_file(path, os.O_RDONLY)
        try:
            return read_regular(fd, max_file_bytes)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise InputError(codes.CLIENT_INPUT_ERROR, "file not found") from None
    except IsADirectoryError:
        raise InputError(codes.CLIENT_INPUT_ERROR, "is a directory, not an image file") from None
    except PermissionError:
        raise InputError(codes.CLIENT_INPUT_ERROR, "permission denied") from None
    except OSError as exc:
        raise InputError(codes.CLIENT_INPUT_ERROR, f"cannot read file: {exc.strerror or exc}") from None
    except ValueError:  # a NUL byte in the path
        raise InputError(codes.CLIENT_INPUT_ERROR, "invalid path") from None


def read_regular(fd: int, max_file_bytes: int) -> bytes:
    """The bytes of an open regular file, sized by fstat: plain ``os.read`` calls, because a
    buffered ``read(max_file_bytes + 1)`` sets up a buffer of the cap (200 MiB) for every
    10 KB photo. A file that grows while it is read is read on, up to the cap."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # swapped for something else since the check
        raise InputError(codes.CLIENT_INPUT_ERROR, "not a regular file")
    if info.st_size > max_file_bytes:
        raise too_large(info.st_size, max_file_bytes)
    chunks, total = [], 0
    while chunk := os.read(fd, max(info.st_size + 1 - total, READ_MORE_BYTES)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_file_bytes:  # it grew while we read
            raise too_large(total, max_file_bytes)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_file(path: str, max_file_bytes: int = MAX_FILE_BYTES) -> bytes:
    return await asyncio.to_thread(read_file_now, path, max_file_bytes)


@dataclass
class FileRead:
    """A file's bytes as read, and what its record will say it was made from."""

    data: bytes
    facts: FileFacts | None


def read_image_now(item: Item, max_file_bytes: int = MAX_FILE_BYTES) -> FileRead:
    """Read a file item and hash its bytes (XXH3-128, ~13 GB/s), blocking. The facts carry
    the walker's stat, taken before the read."""
    data = read_file_now(item.location, max_file_bytes)
    size, mtime_ns = (item.size, item.mtime_ns) if item.size is not None else (len(data), None)
    facts = FileFacts(size, mtime_ns, content_hash(data)) if mtime_ns is not None else None
    return FileRead(data, facts)


async def read_image(item: Item, max_file_bytes: int = MAX_FILE_BYTES) -> FileRead:
    return await asyncio.to_thread(read_image_now, item, max_file_bytes)


def read_images_now(items: list[Item], max_file_bytes: int) -> list[FileRead | InputError]:
    return [_read_or_error(item, max_file_bytes) for item in items]


def _read_or_error(item: Item, max_file_bytes: int) -> FileRead | InputError:
    try:
        return read_image_now(item, max_file_bytes)
    except InputError as exc:
        return exc


async def read_images(items: list[Item], max_file_bytes: int = MAX_FILE_BYTES) -> list[FileRead | InputError]:
    """Several files read and hashed in one worker-thread hop: a hop (submit, wake a thread,
    hand the result back) costs about as much CPU as reading a small photo, so the files
    the queue already holds are read together (``READ_BATCH_*``)."""
    if not items:
        return []
    if reads_inline(items):
        return read_images_now(items, max_file_bytes)
    return await asyncio.to_thread(read_images_now, items, max_file_bytes)


def reads_inline(items: list[Item]) -> bool:
    """Whether a batch is small enough (by the walker's sizes) to read on the event loop, as
    a bare client would. A reading thread gives up the GIL at every open, fstat and read and
    the event loop takes it back: a 3,000-file run of 4 KB photos made 94,000 futex calls
    (~30 a request, 1,500 read inline) and cost ~15 % more CPU per request. The price: a
    disk that stalls on one of these small reads stalls the loop for that long."""
    total = 0
    for item in items:
        if item.size is None:
            return False
        total += item.size
    return total <= INLINE_READ_BYTES


async def make_sendable(data: bytes, name: str) -> tuple[bytes, dict[str, Any]]:
    """Convert or turn upright when needed (in a thread: that decodes), else as is."""
    if not needs_work(data):
        return data, {}
    return await asyncio.to_thread(sendable, data, name)


def shrink_to_fit(data: bytes, limit: int) -> tuple[bytes, dict[str, Any]]:
    """Re-encode an oversized image as a JPEG under ``limit`` bytes, halving the pixel
    count each try. Runs in a worker thread: decoding a big image takes a while. The pixel
    budget counts what is decoded: a JPEG at half scale or less (``decoding``)."""
    declared: list[tuple[int, int]] = []

    def half_size(size: tuple[int, int]) -> tuple[str, tuple[int, int]]:
        declared.append(size)
        return "RGB", (size[0] // 2, size[1] // 2)

    try:
        with open_within_budget(io.BytesIO(data), draft=half_size) as img:
            image = img.convert("RGB")
    except OverBudget as exc:
        raise InputError(codes.IMAGE_TOO_LARGE, exc.message) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InputError(
            codes.IMAGE_DECODE_FAILED, "image over the size limit and cannot be decoded to shrink it"
        ) from None
    original = declared[0]
    width, height = original
    scale = min(1.0, (limit / max(len(data), 1)) ** 0.5)
    while True:
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        out = io.BytesIO()
        image.resize(size, Image.Resampling.LANCZOS if scale > 0.25 else Image.Resampling.BILINEAR).save(
            out, "JPEG", quality=RESIZE_QUALITY
        )
        if out.tell() <= limit or max(size) <= 64:
            break
        scale *= 0.7
    resized = out.getvalue()
    note = {
        "from_bytes": len(data),
        "to_bytes": len(resized),
        "from_size": list(original),
        "to_size": list(size),
    }
    return resized, note


def url_payload(item: Item, appid: str, bucket: str, body: bool = True) -> Payload:
    if problem := url_problem(item.location):
        raise InputError(codes.URL_FORMAT, problem)
    if not body:
        return Payload(b"", url=item.location)
    return Payload(body_bytes(appid, bucket, "url", json.dumps(item.location)[1:-1].encode()))


async def build_payload(
    item: Item,
    appid: str,
    bucket: str,
    max_image_bytes: int = api.MAX_IMAGE_BYTES,
    max_file_bytes: int = MAX_FILE_BYTES,
    body: bool = True,
) -> Payload:
    """The request for an item (URL or file), in one step; ``body=False`` leaves out the JSON
    body (and its base64) for a transport that takes the source as it is (embedded)."""
    if item.kind == "url":
        return url_payload(item, appid, bucket, body)
    read = await read_image(item, max_file_bytes)
    return await image_payload(read.data, item.location, appid, bucket, max_image_bytes, body)


async def image_payload(
    data: bytes,
    name: str,
    appid: str,
    bucket: str,
    max_image_bytes: int = api.MAX_IMAGE_BYTES,
    body: bool = True,
) -> Payload:
    """The request body for a file's bytes: converted, upright, under the size limit."""
    if not data:
        raise InputError(codes.IMAGE_EMPTY, "empty file")
    data, notes = await make_sendable(data, name)
    if len(data) > max_image_bytes:
        data, notes["resized"] = await asyncio.to_thread(shrink_to_fit, data, max_image_bytes)
    if not body:
        return Payload(b"", notes, image=data)
    if len(data) <= INLINE_ENCODE_BYTES:
        encoded = base64.b64encode(data)
    else:
        encoded = await asyncio.to_thread(base64.b64encode, data)
    return Payload(body_bytes(appid, bucket, "image", encoded), notes)
