"""Payloads: read an item's image and build the request body, before any request is spent.

Files are read with aiofiles so a slow disk never stalls the event loop; their content
hash is taken from the same bytes (``read_image``), so the pipeline can reuse an earlier
record for identical bytes before any encoding. Problems the server would only answer
with a permanent error (missing, unreadable, empty, not an image) are caught here and
cost no request or quota. Formats the API does not take are converted and turned images
made upright (``formats``); an image over the API's size limit is downscaled and
re-encoded as JPEG instead of failing with code 20.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from dataclasses import dataclass, field
from typing import Any

import aiofiles
from PIL import Image, UnidentifiedImageError

from batchtag import api, codes
from batchtag.errors import InputError
from batchtag.formats import needs_work, sendable
from batchtag.records import FileFacts, content_hash
from batchtag.sources import Item, url_problem

INLINE_ENCODE_BYTES = 256 * 1024  # bigger images are base64-encoded off the event loop
HASH_INLINE_BYTES = 4 * 1024 * 1024  # bigger files are hashed off the event loop
RESIZE_QUALITY = 88


@dataclass
class Payload:
    body: bytes  # the JSON request body, without signature (that goes in a header)
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. "resized", recorded with the result
    facts: FileFacts | None = None  # what the file's record will say it was made from


def body_bytes(appid: str, bucket: str, source_field: str, value: bytes) -> bytes:
    """The JSON body, assembled directly: no detour of a 10 MB base64 string through json."""
    head = {"appid": appid, "bucket": bucket} if bucket else {"appid": appid}
    prefix = json.dumps(head, separators=(",", ":"))[:-1].encode()
    return prefix + b',"' + source_field.encode() + b'":"' + value + b'"}'


async def read_file(path: str) -> bytes:
    try:
        async with aiofiles.open(path, "rb") as handle:
            return await handle.read()
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


@dataclass
class FileRead:
    """A file's bytes as read, and what its record will say it was made from."""

    data: bytes
    facts: FileFacts | None


async def read_image(item: Item) -> FileRead:
    """Read a file item and hash its bytes (XXH3-128, ~13 GB/s: off the loop only for big
    files). The facts carry the walker's stat, taken before the read."""
    data = await read_file(item.location)
    digest = (
        content_hash(data) if len(data) <= HASH_INLINE_BYTES else await asyncio.to_thread(content_hash, data)
    )
    size, mtime_ns = (item.size, item.mtime_ns) if item.size is not None else (len(data), None)
    facts = FileFacts(size, mtime_ns, digest) if mtime_ns is not None else None
    return FileRead(data, facts)


async def make_sendable(data: bytes, name: str) -> tuple[bytes, dict[str, Any]]:
    """Convert or turn upright when needed (in a thread: that decodes), else as is."""
    if not needs_work(data):
        return data, {}
    return await asyncio.to_thread(sendable, data, name)


def shrink_to_fit(data: bytes, limit: int) -> tuple[bytes, dict[str, Any]]:
    """Re-encode an oversized image as a JPEG under ``limit`` bytes, halving the pixel
    count each try. Runs in a worker thread: decoding a big image takes a while."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            original = img.size
            img.draft("RGB", (original[0] // 2, original[1] // 2))
            image = img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError):
        raise InputError(
            codes.IMAGE_DECODE_FAILED, "image over the size limit and cannot be decoded to shrink it"
        ) from None
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


def url_payload(item: Item, appid: str, bucket: str) -> Payload:
    if problem := url_problem(item.location):
        raise InputError(codes.URL_FORMAT, problem)
    return Payload(body_bytes(appid, bucket, "url", json.dumps(item.location)[1:-1].encode()))


async def build_payload(
    item: Item, appid: str, bucket: str, max_image_bytes: int = api.MAX_IMAGE_BYTES
) -> Payload:
    """The request body for an item (URL or file), in one step."""
    if item.kind == "url":
        return url_payload(item, appid, bucket)
    read = await read_image(item)
    return await image_payload(read.data, item.location, appid, bucket, max_image_bytes)


async def image_payload(
    data: bytes, name: str, appid: str, bucket: str, max_image_bytes: int = api.MAX_IMAGE_BYTES
) -> Payload:
    """The request body for a file's bytes: converted, upright, under the size limit."""
    if not data:
        raise InputError(codes.IMAGE_EMPTY, "empty file")
    data, notes = await make_sendable(data, name)
    if len(data) > max_image_bytes:
        data, notes["resized"] = await asyncio.to_thread(shrink_to_fit, data, max_image_bytes)
    if len(data) <= INLINE_ENCODE_BYTES:
        encoded = base64.b64encode(data)
    else:
        encoded = await asyncio.to_thread(base64.b64encode, data)
    return Payload(body_bytes(appid, bucket, "image", encoded), notes)
