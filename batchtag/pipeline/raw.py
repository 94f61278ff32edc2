"""The largest JPEG preview inside a camera RAW file (DNG, NEF, ARW, CR2).

These formats are TIFF containers: besides the sensor data, cameras store a JPEG
rendering for their own screen, often full size. Tagging that preview needs no RAW
decoder (rawpy/LibRaw is a large native dependency for pixels we do not need); a walk
over the TIFF directories finds it. Pillow's TIFF reader stops at the first directory and
does not follow SubIFDs, where NEF and DNG keep their previews, hence this small walker.
Bounded against hostile files: at most 64 directories, each visited once.
"""

from __future__ import annotations

import struct

MAX_IFDS = 64
MAX_ENTRIES = 1024

COMPRESSION, STRIP_OFFSETS, STRIP_BYTE_COUNTS = 0x0103, 0x0111, 0x0117
SUB_IFDS, JPEG_OFFSET, JPEG_LENGTH, EXIF_IFD = 0x014A, 0x0201, 0x0202, 0x8769
JPEG_COMPRESSIONS = (6, 7)
# JPEG frames Pillow decodes: baseline, extended, progressive (not lossless, used for raw data).
DECODABLE_FRAMES = (0xC0, 0xC1, 0xC2)
TYPE_SIZES = {1: 1, 3: 2, 4: 4, 13: 4, 16: 8}


def largest_jpeg_preview(data: bytes) -> bytes | None:
    """The biggest decodable JPEG embedded in a TIFF-based RAW file, or None."""
    if data[:4] == b"II*\x00":
        endian = "<"
    elif data[:4] == b"MM\x00*":
        endian = ">"
    else:
        return None
    candidates = sorted(_candidates(data, endian), key=lambda span: span[1], reverse=True)
    for offset, length in candidates:
        jpeg = data[offset : offset + length]
        if _decodable_jpeg(jpeg):
            return jpeg
    return None


def _candidates(data: bytes, endian: str) -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    pending = [struct.unpack_from(endian + "I", data, 4)[0]]
    seen: set[int] = set()
    while pending and len(seen) < MAX_IFDS:
        offset = pending.pop()
        if offset in seen or not 8 <= offset < len(data) - 2:
            continue
        seen.add(offset)
        tags, following = _read_ifd(data, endian, offset)
        pending += [o for o in tags.get(SUB_IFDS, ()) + tags.get(EXIF_IFD, ()) if o]
        if following:
            pending.append(following)
        if JPEG_OFFSET in tags and JPEG_LENGTH in tags:
            found.append((tags[JPEG_OFFSET][0], tags[JPEG_LENGTH][0]))
        strips, counts = tags.get(STRIP_OFFSETS, ()), tags.get(STRIP_BYTE_COUNTS, ())
        if len(strips) == 1 and len(counts) == 1 and tags.get(COMPRESSION, (0,))[0] in JPEG_COMPRESSIONS:
            found.append((strips[0], counts[0]))
    return [(o, n) for o, n in found if n > 4 and o + n <= len(data) and data[o : o + 2] == b"\xff\xd8"]


def _read_ifd(data: bytes, endian: str, offset: int) -> tuple[dict[int, tuple[int, ...]], int]:
    """The integer tags of one directory and the offset of the next (0 at the end)."""
    try:
        (count,) = struct.unpack_from(endian + "H", data, offset)
        tags: dict[int, tuple[int, ...]] = {}
        for index in range(min(count, MAX_ENTRIES)):
            tag, kind, n, value = struct.unpack_from(endian + "HHII", data, offset + 2 + 12 * index)
            size = TYPE_SIZES.get(kind)
            if size is None or n == 0 or n > 4096:
                continue
            where = offset + 2 + 12 * index + 8 if size * n <= 4 else value
            code = {1: "B", 3: "H", 4: "I", 13: "I", 16: "Q"}[kind]
            tags[tag] = struct.unpack_from(endian + code * n, data, where)
        (following,) = struct.unpack_from(endian + "I", data, offset + 2 + 12 * min(count, MAX_ENTRIES))
    except struct.error:
        return {}, 0
    return tags, following


def _decodable_jpeg(jpeg: bytes) -> bool:
    """Walk the JPEG's segments to its frame header: lossless frames hold raw sensor data."""
    position = 2
    while position + 4 <= len(jpeg):
        if jpeg[position] != 0xFF:
            return False
        marker = jpeg[position + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker in DECODABLE_FRAMES
        (length,) = struct.unpack_from(">H", jpeg, position + 2)
        position += 2 + length
    return False
