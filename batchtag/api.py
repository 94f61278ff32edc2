"""Facts about the image-tag API that both the client and ``batchtag serve`` rely on."""

from __future__ import annotations

DETECT_PATH = "/v1/detection/imagetag_detect"
HEALTH_PATH = "/healthz"

# The largest image (decoded file bytes) the service accepts; bigger ones get code 20.
# The client downscales above it rather than spending a request on a certain failure.
MAX_IMAGE_BYTES = 10 * 1024 * 1024

# The most pixels the service decodes (header's width x height); more is code 20, refused
# before decoding (a decompression bomb). The client and the report keep to it too
# (``batchtag.decoding``, the one budget).
MAX_IMAGE_PIXELS = 50_000_000

# Formats the API accepts, by the file's leading bytes (extensions lie).
IMAGE_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"BM": "BMP",
}


def sniff_format(head: bytes) -> str | None:
    """The API format the bytes start with, or None when they are not JPG/PNG/BMP."""
    for magic, name in IMAGE_MAGIC.items():
        if head.startswith(magic):
            return name
    return None


def detect_url(endpoint: str) -> str:
    """The detect URL for a base endpoint; a full URL that already names the path is kept."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(DETECT_PATH) else endpoint + DETECT_PATH
