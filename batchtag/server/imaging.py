"""Request bytes to an RGB image the tagger can use, with every failure mapped to an API code.

Runs in a worker thread (Pillow releases the GIL while decoding). Untrusted input is
bounded three ways before any pixel is decoded: the byte size, the format (JPEG, PNG and
BMP only, so none of Pillow's rarer parsers ever sees request data), and the pixel count
declared in the header, which is what stops a decompression bomb: a tiny PNG claiming
20000x20000 pixels is refused with code 20 without allocating its pixels. The pixel limit
and its check are ``batchtag.decoding``'s, shared with the client and the report.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from batchtag import api, codes
from batchtag.decoding import OverBudget, open_within_budget
from batchtag.errors import ApiError
from batchtag.orientation import orientation_of, upright

ACCEPTED_FORMATS = tuple(api.IMAGE_MAGIC.values())
# Modes Image.reduce handles; palette, bilevel and 16-bit images are converted first.
REDUCIBLE_MODES = frozenset({"RGB", "RGBA", "L", "LA", "CMYK"})
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class DecodeLimits:
    max_image_bytes: int
    max_pixels: int
    # The shortest side worth decoding (the tagger's input_size); None = full size.
    min_side: int | None = None


def decode_base64(text: str, max_image_bytes: int) -> bytes:
    """The ``image`` field's bytes; oversized payloads are refused before decoding them."""
    if not text:
        raise ApiError(codes.IMAGE_EMPTY)
    if len(text) * 3 // 4 > max_image_bytes + 3:
        raise ApiError(codes.IMAGE_TOO_LARGE, _over_bytes_limit(max_image_bytes))
    try:
        data = _strict_b64decode(text)
    except (binascii.Error, ValueError):
        raise ApiError(codes.IMAGE_FORMAT, "image is not valid base64") from None
    if not data:
        raise ApiError(codes.IMAGE_EMPTY)
    if len(data) > max_image_bytes:
        raise ApiError(codes.IMAGE_TOO_LARGE, _over_bytes_limit(max_image_bytes))
    return data


def _strict_b64decode(text: str) -> bytes:
    """Standard alphabet only, but tolerate the line breaks MIME encoders insert."""
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        if not _WHITESPACE.search(text):
            raise
        return base64.b64decode(_WHITESPACE.sub("", text), validate=True)


def decode_image(data: bytes, limits: DecodeLimits) -> Image.Image:
    """An RGB image from JPEG/PNG/BMP bytes, reduced for the tagger when it allows, and
    upright as its EXIF orientation says (read from the header before decoding)."""
    if not data:
        raise ApiError(codes.IMAGE_EMPTY)
    if len(data) > limits.max_image_bytes:
        raise ApiError(codes.IMAGE_TOO_LARGE, _over_bytes_limit(limits.max_image_bytes))
    image = _open_header(data, limits.max_pixels)
    orientation = orientation_of(image)
    if limits.min_side and image.format == "JPEG":
        # Let libjpeg decode at 1/2..1/8 scale: a 24 MP photo costs a fraction of the time.
        image.draft("RGB", (limits.min_side, limits.min_side))
    return upright(_load_rgb(image, limits.min_side), orientation)


def _open_header(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the format from the header only and check the declared size (the API's
    rule, before any draft); no pixel is decoded yet."""
    try:
        image = open_within_budget(io.BytesIO(data), ACCEPTED_FORMATS, max_pixels=max_pixels)
    except OverBudget as exc:
        raise ApiError(codes.IMAGE_TOO_LARGE, exc.message) from None
    except UnidentifiedImageError:
        raise ApiError(codes.IMAGE_FORMAT, "not a JPG, PNG or BMP image") from None
    except Exception:  # Pillow's header parsers raise a grab-bag (SyntaxError, struct.error, ...)
        raise ApiError(codes.IMAGE_DECODE_FAILED, "image header is corrupt") from None
    if min(image.size) <= 0:
        raise ApiError(codes.IMAGE_DECODE_FAILED, "image has no pixels")
    return image


def _load_rgb(image: Image.Image, min_side: int | None) -> Image.Image:
    try:
        image.load()
        reduced = _reduce_for_tagger(image, min_side)
        return reduced if reduced.mode == "RGB" else reduced.convert("RGB")
    except MemoryError:
        raise ApiError(codes.IMAGE_TOO_LARGE, "image too large to decode") from None
    except Exception:  # truncated data, broken zlib streams, unsupported modes, ...
        raise ApiError(codes.IMAGE_DECODE_FAILED, "image data is corrupt or truncated") from None


def _reduce_for_tagger(image: Image.Image, min_side: int | None) -> Image.Image:
    """Shrink by a whole factor while the short side stays >= ``min_side``.

    Keeps the images waiting in the batcher's queue small; the tagger does its own exact
    resize, so a cheap box reduction is all that is needed here.
    """
    factor = min(image.size) // min_side if min_side else 0
    if factor < 2:
        return image
    if image.mode not in REDUCIBLE_MODES:
        image = image.convert("RGB")
    return image.reduce(factor)


def _over_bytes_limit(max_image_bytes: int) -> str:
    return f"over the limit of {max_image_bytes} bytes"
