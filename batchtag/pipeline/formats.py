"""Make a file's bytes something the API takes, upright: conversions done on the client.

The API takes JPEG, PNG and BMP. HEIC/HEIF (pillow-heif), WebP and TIFF are decoded and
re-encoded as JPEG; camera RAW files (DNG, NEF, ARW, CR2: all TIFF inside) send the
largest JPEG preview they embed (``raw_preview``). An image whose EXIF orientation says
its pixels are stored turned is re-encoded upright; every other JPEG/PNG/BMP is sent
byte for byte. Runs in a worker thread: decoding takes milliseconds to seconds. Every
decode here keeps to the one pixel budget (``decoding``): over it is code 20, undecoded.
"""

from __future__ import annotations

import io
import os
from typing import Any

from PIL import Image

from batchtag import api, codes
from batchtag.decoding import OverBudget, open_within_budget
from batchtag.errors import InputError
from batchtag.orientation import UPRIGHT, orientation_of, upright
from batchtag.pipeline.raw import largest_jpeg_preview
from batchtag.pipeline.sources import RAW

JPEG_QUALITY = 92
CONVERTIBLE_FORMATS = ("HEIF", "WEBP", "TIFF")
# Where an orientation tag can be: a JPEG's EXIF segment, a PNG's eXIf chunk.
EXIF_MARKERS = (b"Exif\x00\x00", b"eXIf")
EXIF_SEARCH_BYTES = 128 * 1024
JPEG_START = b"\xff\xd8"

# HEIF brands (ISO/IEC 23008-12) in an ``ftyp`` box: still images and sequences, HEVC or not.
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
SNIFF_BYTES = 16

_heif_registered = False


def sniff_image(head: bytes) -> str | None:
    """The image format the first ``SNIFF_BYTES`` bytes say, among those batchtag tags (what
    the API takes, what it converts, RAW files, which are TIFF inside), or None. Extensions
    lie; an export writes beside a file only when its bytes say it is an image."""
    if api_format := api.sniff_format(head):
        return api_format
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return "HEIF"
    return None


def register_heif() -> None:
    """Teach Pillow HEIC/HEIF once, on first need (pillow-heif loads libheif)."""
    global _heif_registered
    if not _heif_registered:
        from pillow_heif import register_heif_opener

        register_heif_opener()
        _heif_registered = True


def sendable(data: bytes, name: str) -> tuple[bytes, dict[str, Any]]:
    """The bytes to send for a file read as ``data`` (``name`` tells RAW files apart),
    and notes for its record (``converted``, ``uprighted``)."""
    if api.sniff_format(data[:16]) is not None:
        return _upright_if_needed(data) if may_be_turned(data) else (data, {})
    if os.path.splitext(name)[1].lower() in RAW:
        preview = largest_jpeg_preview(data)
        if preview is None:
            raise InputError(codes.IMAGE_FORMAT, "camera RAW file without a readable JPEG preview")
        sent, notes = _upright_if_needed(preview)
        return sent, {"converted": {"from": "RAW", "to": "JPEG (embedded preview)"}, **notes}
    return _convert(data)


def needs_work(data: bytes) -> bool:
    """Whether ``sendable`` has anything to do: the common JPEG without EXIF is sent as is,
    with no thread hop and no decoding."""
    return api.sniff_format(data[:16]) is None or may_be_turned(data)


def may_be_turned(data: bytes) -> bool:
    """Whether the bytes may carry an orientation tag (then Pillow reads it in a thread)."""
    if data[:2] == JPEG_START:
        return jpeg_has_exif(data)
    return any(data.find(marker, 0, EXIF_SEARCH_BYTES) >= 0 for marker in EXIF_MARKERS)


def jpeg_has_exif(data: bytes) -> bool:
    """Walk a JPEG's marker segments up to the image data looking for an EXIF APP1 segment:
    a few steps, where searching the bytes for "Exif" scanned up to 128 KiB of every photo.
    Anything unexpected answers True, so Pillow judges it."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return True
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in (0xDA, 0xD9):  # start of scan, end of image: no EXIF in this file
            return False
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            if marker == 0xE1 and data[pos + 4 : pos + 10] == EXIF_MARKERS[0]:
                return True
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return True


def _upright_if_needed(data: bytes) -> tuple[bytes, dict[str, Any]]:
    try:
        with open_within_budget(io.BytesIO(data)) as image:
            orientation = orientation_of(image)
            if orientation == UPRIGHT:
                return data, {}
            turned = upright(image.convert("RGB"), orientation)
    except OverBudget as exc:
        raise InputError(codes.IMAGE_TOO_LARGE, exc.message) from None
    except (OSError, ValueError, SyntaxError):
        return data, {}  # let the service judge the bytes as they are
    return _jpeg(turned), {"uprighted": {"orientation": orientation}}


def _convert(data: bytes) -> tuple[bytes, dict[str, Any]]:
    register_heif()
    try:
        with open_within_budget(io.BytesIO(data), CONVERTIBLE_FORMATS) as image:
            source_format = image.format or "?"
            orientation = orientation_of(image)
            turned = upright(image.convert("RGB"), orientation)
    except OverBudget as exc:
        raise InputError(codes.IMAGE_TOO_LARGE, exc.message) from None
    except Exception:  # Pillow and libheif raise a grab-bag for unreadable files
        raise InputError(codes.IMAGE_FORMAT, "not an image format batchtag can send or convert") from None
    notes: dict[str, Any] = {"converted": {"from": source_format, "to": "JPEG"}}
    if orientation != UPRIGHT:
        notes["uprighted"] = {"orientation": orientation}
    return _jpeg(turned), notes


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
