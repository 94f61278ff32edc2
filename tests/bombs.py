"""Decompression bombs: small files whose headers declare far more pixels than they hold.

PNG and TIFF are real images of black pixels, deflated (hundreds of KB that decode to
hundreds of MB: what makes a report's memory explode); the others are small images with
their declared size patched, so Pillow opens them as that size and would allocate
width x height pixels to decode them. Sizes stay under Pillow's own error (179 megapixels), which would
otherwise refuse them before batchtag's budget is even asked; JPEG is the exception (see
``jpeg_bomb``).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

from PIL import Image

from tests.support import encode_image

SIDE = 12_000  # 144 megapixels: over the 50-megapixel budget, under Pillow's own error


@functools.cache
def zeros_compressed(total: int, row: bytes = b"") -> bytes:
    """``total`` zero bytes deflated, fed in pieces (never held whole); with ``row`` the
    stream is that row repeated ``total`` times instead (PNG's filter byte and pixels)."""
    packer = zlib.compressobj(9)
    if row:
        out = [packer.compress(row) for _ in range(total)]
    else:
        piece = b"\x00" * (1 << 20)
        out = [packer.compress(piece) for _ in range(total >> 20)]
        out.append(packer.compress(b"\x00" * (total & ((1 << 20) - 1))))
    out.append(packer.flush())
    return b"".join(out)


def png_bomb(width: int = SIDE, height: int = SIDE, exif: bool = False) -> bytes:
    """A real RGB PNG of black pixels, about 420 KB (the issue's bomb: decoding it fills
    430 MB); with ``exif`` an eXIf chunk saying "turned 90°", which sends it through the
    client's uprighting (a full decode) instead of as is."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    extra = chunk(b"eXIf", exif_orientation(6)) if exif else b""
    pixels = zeros_compressed(height, b"\x00" * (1 + 3 * width))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def exif_orientation(value: int) -> bytes:
    """A little-endian TIFF-style EXIF block holding only the orientation tag."""
    return b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, value, 0) + b"\x00" * 4


def jpeg_bomb(width: int = 60_000, height: int = 60_000, orientation: int | None = None) -> bytes:
    """A small JPEG with its frame header (SOF0) patched. JPEG is decoded at 1/8 scale where
    a thumbnail or the tagger needs no more, so a bomb must be big even at 1/8 (60000 px a
    side: 56 megapixels at 1/8); Pillow's own limit stops this one first. With an EXIF
    ``orientation`` the client decodes it to turn it upright (at full size)."""
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    options = {"exif": exif.tobytes()} if orientation is not None else {}
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "JPEG", **options)
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def bmp_bomb(width: int = SIDE, height: int = SIDE) -> bytes:
    data = bytearray(encode_image("BMP", (4, 4)))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def gif_bomb(width: int = SIDE, height: int = SIDE) -> bytes:
    """Logical screen and the first image descriptor both patched."""
    data = bytearray(encode_image("GIF", (4, 4)))
    struct.pack_into("<HH", data, 6, width, height)
    descriptor = data.index(b"\x2c", 13)
    struct.pack_into("<HH", data, descriptor + 5, width, height)
    return bytes(data)


def tiff_bomb(width: int = SIDE, height: int = SIDE) -> bytes:
    """A real grey TIFF of black pixels in one deflated strip (about 140 KB for 144 MB)."""
    strip = zeros_compressed(width * height)
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 8),  # Adobe deflate
        (262, 3, 1, 1),
        (273, 4, 1, 0),  # strip offset, filled in below
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, len(strip)),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    strip_at = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = strip_at if tag == 273 else value
        packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + strip


def raw_bomb(preview: bytes | None = None) -> bytes:
    """A TIFF-based camera RAW file (save it as .dng) whose embedded JPEG preview is a bomb."""
    preview = preview if preview is not None else jpeg_bomb(SIDE, SIDE, orientation=6)
    entries = [(256, 4, 1, 160), (257, 4, 1, 120), (0x0201, 4, 1, 0), (0x0202, 4, 1, len(preview))]
    ifd_size = 2 + 12 * len(entries) + 4
    preview_at = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = preview_at if tag == 0x0201 else value
        ifd += struct.pack("<HHII", tag, kind, count, value)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + preview


def webp_bomb(width: int = SIDE, height: int = SIDE) -> bytes:
    """A lossless WebP with the 14-bit sizes of its VP8L header patched."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buffer, "WEBP", lossless=True)
    data = bytearray(buffer.getvalue())
    at = data.index(b"VP8L") + 8
    assert data[at] == 0x2F
    bits = int.from_bytes(data[at + 1 : at + 5], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    data[at + 1 : at + 5] = bits.to_bytes(4, "little")
    return bytes(data)


def heic_bomb(width: int = SIDE, height: int = SIDE) -> bytes:
    """A small HEIC (pillow-heif) with its image spatial extents (``ispe``) patched."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "HEIF")
    data = bytearray(buffer.getvalue())
    at = data.index(b"ispe") + 8  # box type, then version and flags
    struct.pack_into(">II", data, at, width, height)
    return bytes(data)


BOMBS = {
    "png": png_bomb,
    "exif.png": lambda: png_bomb(exif=True),
    "jpg": jpeg_bomb,
    "exif.jpg": lambda: jpeg_bomb(SIDE, SIDE, orientation=6),
    "bmp": bmp_bomb,
    "tif": tiff_bomb,
    "webp": webp_bomb,
    "heic": heic_bomb,
    "dng": raw_bomb,
}
