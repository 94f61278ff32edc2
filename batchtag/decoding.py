"""One decoding budget for every place that turns image bytes into pixels, and the one way
image files are opened.

The places: the client's conversions and uprighting (``formats``: HEIC, WebP, TIFF, RAW
previews, EXIF-turned JPEG/PNG), its downscaling of oversized files
(``payload.shrink_to_fit``), the server's decode (``server/imaging``, also behind the
embedded endpoint) and the report's thumbnails. Each opens the image through
``open_within_budget``, which reads the header only and raises ``OverBudget`` when the
pixels to decode exceed ``api.MAX_IMAGE_PIXELS``; every caller turns that into code 20
(``codes.IMAGE_TOO_LARGE``). A small file declaring a huge size (a decompression bomb) is
so refused before a pixel is allocated, in every format.

What counts is the pixels the decoder allocates: the size the header declares, except that
a JPEG opened with a ``draft`` (libjpeg scales by 1/2 to 1/8 while decoding, so the
full-size pixels never exist) counts its drafted size; a 60-megapixel camera JPEG can still
be shrunk or thumbnailed, a JPEG declaring 60000x60000 cannot. The server counts the
declared size (the API's rule: more pixels than the limit is code 20).

Only regular files are opened (``open_regular``): a FIFO named like an image would block
``open`` and a device may have effects; both are refused without blocking.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from collections.abc import Callable
from typing import IO

from PIL import Image

from batchtag import api, codes

MAX_PIXELS = api.MAX_IMAGE_PIXELS
CODE = codes.IMAGE_TOO_LARGE  # the one answer to an image over the budget, client and server

# Pillow warns from 89 megapixels on; the budget here is lower and an error, so its warning
# would only print noise on stderr (its own error, from 179 megapixels, stays as a backstop).
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

FILE_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


Draft = tuple[str, tuple[int, int]] | Callable[[tuple[int, int]], tuple[str, tuple[int, int]]]


class OverBudget(Exception):
    """The image's pixels exceed the decoding budget (code 20 wherever it is raised)."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class NotRegularFile(OSError):
    """A FIFO, a device or a socket where an image file was expected; never opened."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        super().__init__(f"not a regular file: {kind}")


def check_pixels(size: tuple[int, int], max_pixels: int = MAX_PIXELS) -> None:
    width, height = size
    if width * height > max_pixels:
        raise OverBudget(f"{width}x{height} pixels exceeds the limit of {max_pixels} pixels")


def open_within_budget(
    source: IO[bytes],
    formats: tuple[str, ...] | None = None,
    draft: Draft | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """The image, header read and no pixel decoded yet, or ``OverBudget``. ``draft`` (mode,
    size), or a function of the declared size giving them, asks a JPEG to decode at reduced
    scale; the budget then counts that scale. Pillow's own bomb error (a header of more
    than twice its limit) is OverBudget too."""
    try:
        image = Image.open(source, formats=formats)
    except Image.DecompressionBombError:
        raise OverBudget("image dimensions exceed the pixel limit") from None
    try:
        if draft is not None:
            image.draft(*(draft(image.size) if callable(draft) else draft))
        check_pixels(image.size, max_pixels)
    except BaseException:
        image.close()
        raise
    return image


def open_regular(path: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the regular file at ``path`` (symlinks followed), opened without
    blocking; NotRegularFile before opening anything else, IsADirectoryError for a folder."""
    kind = stat.S_IFMT(os.stat(path).st_mode)
    if kind == stat.S_IFDIR:
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if kind != stat.S_IFREG:
        raise NotRegularFile(FILE_KINDS.get(kind, "special"))
    return os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)


def open_image_file(path: str) -> IO[bytes]:
    """A regular image file for reading (checked again after opening, in case it was swapped
    for something else between the check and the open)."""
    handle = os.fdopen(open_regular(path), "rb")
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
        handle.close()
        raise NotRegularFile("swapped for something else")
    return handle
