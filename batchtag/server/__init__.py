"""``batchtag serve``: a local implementation of the image-tag API.

The public surface used by the CLI and by the client's embedded mode is re-exported here.

Routes: ``POST /v1/detection/imagetag_detect`` (the API), ``GET /healthz`` (200 once the
tagger is loaded and the batcher runs), ``GET /stats`` (batching and answer counters).

Decisions where the provider's documents are silent:
- every API answer is HTTP 200 with ``{code, message, tags}``, errors included;
- a body over ``max_body_bytes`` (16 MiB: room for a 10 MiB image in base64) and an image
  over ``max_image_bytes`` (10 MiB decoded) are both code 20, still HTTP 200;
- a decompression bomb (more than ``max_pixels`` declared pixels) is code 20, refused
  from the header before any pixel is allocated;
- a ``url`` aimed at a loopback/private/link-local/multicast/reserved address, directly,
  via DNS or via a redirect, is code -1505 "url points at a private address" (permanent);
- a downloaded body that is not a JPG/PNG/BMP image, or is over ``url_max_bytes``, is -1403;
- unexpected exceptions are code 201 with a generic message (logged, without the request);
- ``qps_limit`` is a per-appid token bucket, capacity and rate = the limit (see quota.py);
- injected faults (``inject_error_rate``) are, in equal shares, a plain-text HTTP 503,
  code 203, and a connection closed without an answer; never on /healthz or /stats;
- the access log (``access_log``, on with ``serve -v``) is one line per request: method,
  route template (never the raw path: a 404's path is client text), HTTP status, API code
  and milliseconds; never headers, query strings, bodies or signatures. A request aiohttp
  cannot parse is ``(malformed request) 400`` there and nowhere else;
- the Authorization header is checked before the body is read (see app.py for the order);
- slow clients: ``idle_timeout_s`` closes connections without a complete request head
  (idle keep-alive or half-sent), ``body_timeout_s`` answers a late body HTTP 408 and closes;
- ``max_signature_lifetime_s`` bounds how long a reusable signature may be valid (code 9);
  an account with a ``bucket`` accepts only that bucket (code 16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Imported on first use, so the CLI can read ``batchtag.server.config``'s defaults for
# ``serve --help`` without loading aiohttp, numpy and the taggers.
_LAZY = {
    "EmbeddedService": "batchtag.server.embedded",
    "RunningServer": "batchtag.server.runner",
    "ServeConfig": "batchtag.server.config",
    "create_app": "batchtag.server.app",
    "load_credentials_file": "batchtag.server.credentials",
    "serve_forever": "batchtag.server.runner",
    "start_server": "batchtag.server.runner",
    "throwaway_credentials": "batchtag.server.credentials",
}

if TYPE_CHECKING:
    from batchtag.server.app import create_app
    from batchtag.server.config import ServeConfig
    from batchtag.server.credentials import load_credentials_file, throwaway_credentials
    from batchtag.server.embedded import EmbeddedService
    from batchtag.server.runner import RunningServer, serve_forever, start_server

__all__ = [
    "EmbeddedService",
    "RunningServer",
    "ServeConfig",
    "create_app",
    "load_credentials_file",
    "serve_forever",
    "start_server",
    "throwaway_credentials",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'batchtag.server' has no attribute {name!r}")
