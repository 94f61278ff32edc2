"""Everything ``batchtag serve`` (and the client's embedded mode) can tune, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from batchtag import api
from batchtag.signing import Credentials
from batchtag.taggers.base import DEFAULT_MIN_CONFIDENCE

MIB = 1024 * 1024

# The API refuses images over 10 MiB (decoded) with code 20. Their base64 form is 4/3 as
# large, so a body up to 16 MiB can still carry a legal image plus JSON; anything larger is
# refused before it is read, also with code 20 (HTTP 200, like every API answer).
DEFAULT_MAX_IMAGE_BYTES = api.MAX_IMAGE_BYTES
DEFAULT_MAX_BODY_BYTES = 16 * MIB

# Slow or silent clients must not hold connections forever. A connection that has not sent a
# complete request head within IDLE seconds (of opening, or of its last answer) is closed:
# aiohttp's keep-alive timer covers idle keep-alive connections and half-sent heads alike,
# since both are "waiting for a request". Above the 15 s our own client (aiohttp's default)
# keeps idle connections, so the server is not the one to close a connection being reused.
DEFAULT_IDLE_TIMEOUT_S = 30.0
# The whole body must arrive within this long once the head has: 16 MiB in 60 s is 2.2 Mbit/s.
DEFAULT_BODY_TIMEOUT_S = 60.0
# The longest a signature may be valid (e - t). The provider's SDK signs for 30 s and batchtag
# run for 600 s; a day leaves any sensible client room while bounding what a leaked one is worth.
DEFAULT_MAX_SIGNATURE_LIFETIME_S = 24 * 3600


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080  # 0 = pick a free port
    tagger: str = "model"  # "model" | "color"
    lang: str = "zh"  # "zh" | "en"
    faces: bool = True  # the model tagger's people stage (face detector); off: --no-faces
    min_confidence: int = DEFAULT_MIN_CONFIDENCE  # tags below this are not answered (--min-confidence)
    stages: str | None = None  # the model tagger's stages, comma-separated (--stages); None: defaults
    float_classifier: bool = False  # the unquantized classifier (--float-classifier)
    min_confidence: int = DEFAULT_MIN_CONFIDENCE  # tags below this are not answered (--min-confidence)
    stages: str | None = None  # the model tagger's stages, comma-separated (--stages); None: defaults
    float_classifier: bool = False  # the unquantized classifier (--float-classifier)
    credentials: list[Credentials] = field(default_factory=list)
    qps_limit: float | None = None  # per appid; None = unlimited
    inject_latency_ms: float = 0.0
    inject_latency_jitter_ms: float = 0.0
    inject_error_rate: float = 0.0
    allow_private_urls: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = api.MAX_IMAGE_PIXELS  # decompression-bomb guard, the one budget (decoding.py)
    url_timeout_s: float = 10.0
    url_max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    batch_max: int | None = None  # None: the tagger's max_batch
    # Natural batching needs no wait (batches form while the tagger is busy); > 0 holds an
    # under-full batch back up to this long for company (it did not help: bench/README.md).
    batch_wait_ms: float = 0.0
    # One INFO line per request on the "batchtag.server.access" logger (`serve -v`): method,
    # route, HTTP status, API code, ms. Never headers, query strings or bodies.
    access_log: bool = False
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_signature_lifetime_s: int = DEFAULT_MAX_SIGNATURE_LIFETIME_S
    # Large bodies (over app.INLINE_JSON_LIMIT, or chunked) read and parsed at once, at most. JSON
    # parsed can take many times its size (16 MiB of "[{},{},...]" is ~350 MB of dicts), so this, not
    # the number of connections, bounds what bodies cost in memory.
    large_body_slots: int = 4

    def __repr__(self) -> str:  # Credentials already hide keys; keep the list short in logs too
        fields = ", ".join(f"{name}={value!r}" for name, value in vars(self).items() if name != "credentials")
        return f"ServeConfig({fields}, credentials=<{len(self.credentials)} entries>)"
