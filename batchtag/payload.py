"""Payloads: read an item's image and build the request body, before any request is spent.

Files are read with aiofiles so a slow disk never stalls the event loop. Problems the
server would only answer with a permanent error (missing, unreadable, empty, not a
JPG/PNG/BMP) are caught here and cost no request or quota. An image over the API's size
limit is downscaled and re-encoded as JPEG instead of failing with code 20.
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
from batchtag.sources import Item, url_problem

INLINE_ENCODE_BYTES = 256 * 1024  # bigger images are base64-encoded off the event loop
RESIZE_QUALITY = 88


@dataclass
class Payload:
    body: bytes  # the JSON request body, without signature (that goes in a header)
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. "resized", recorded with the result


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


def check_image_bytes(data: bytes) -> None:
    if not data:
        raise InputError(codes.IMAGE_EMPTY, "empty file")
    if api.sniff_format(data[:16]) is None:
        raise InputError(codes.IMAGE_FORMAT, "not a JPG, PNG or BMP image")


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


async def build_payload(
    item: Item, appid: str, bucket: str, max_image_bytes: int = api.MAX_IMAGE_BYTES
) -> Payload:
    if item.kind == "url":
        if problem := url_problem(item.location):
            raise InputError(codes.URL_FORMAT, problem)
        return Payload(body_bytes(appid, bucket, "url", json.dumps(item.location)[1:-1].encode()))
    data = await read_file(item.location)
    check_image_bytes(data)
    notes: dict[str, Any] = {}
    if len(data) > max_image_bytes:
        data, notes["resized"] = await asyncio.to_thread(shrink_to_fit, data, max_image_bytes)
    if len(data) <= INLINE_ENCODE_BYTES:
        encoded = base64.b64encode(data)
    else:
        encoded = await asyncio.to_thread(base64.b64encode, data)
    return Payload(body_bytes(appid, bucket, "image", encoded), notes)
