"""The EXIF orientation tag: how a camera says its pixels are stored rotated or mirrored.

Most phones store pixels as the sensor saw them and set this tag instead of rotating; a
model fed those pixels sees a sideways photo (the example coffee cup drops from 95 to 61).
The client sends pixels upright, and ``batchtag serve`` honours the tag for other clients.
"""

from __future__ import annotations

from PIL import Image

ORIENTATION_TAG = 0x0112
UPRIGHT = 1

# The transpose that makes each orientation value upright (EXIF 2.3, section 4.6.4, tag 274).
TRANSPOSE_FOR = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation_of(image: Image.Image) -> int:
    """The orientation an opened image declares (1, upright, when it declares none or
    garbage). Reads the header only, no pixels."""
    try:
        value = image.getexif().get(ORIENTATION_TAG, UPRIGHT)
    except Exception:  # a malformed EXIF block must not cost the image
        return UPRIGHT
    return value if value in TRANSPOSE_FOR else UPRIGHT


def upright(image: Image.Image, orientation: int) -> Image.Image:
    """The image turned as ``orientation`` says; works on a reduced copy too, which has
    lost the EXIF block the value came from."""
    method = TRANSPOSE_FOR.get(orientation)
    return image if method is None else image.transpose(method)
