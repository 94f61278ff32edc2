"""The server's tagging service without HTTP: its state (tagger, credentials, quota, faults,
decode limits; decode threads, URL fetcher and batcher once started) and the one path from
image bytes or a url to tags. The aiohttp app (``app.py``) and the embedded mode
(``embedded.py``) both stand on it; neither reaches into the other.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from PIL import Image

from batchtag import codes
from batchtag.errors import ApiError
from batchtag.server.batcher import Batcher
from batchtag.server.config import ServeConfig
from batchtag.server.credentials import CredentialStore
from batchtag.server.faults import FaultInjector
from batchtag.server.imaging import DecodeLimits, decode_base64, decode_image
from batchtag.server.quota import QuotaLimiter
from batchtag.server.urlfetch import UrlFetcher
from batchtag.taggers import Tag, Tagger, load_tagger, parse_stages, preparer

log = logging.getLogger(__name__)

DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))

T = TypeVar("T")
# A tagger's ``prepare``, run in the decode thread right after decoding; None: pass the image on.
Prepare = Callable[[Image.Image], Any] | None


@dataclass
class ServerState:
    config: ServeConfig
    tagger: Tagger
    credentials: CredentialStore
    quota: QuotaLimiter
    faults: FaultInjector
    limits: DecodeLimits
    prepare: Prepare = None
    answered: Counter[int] = field(default_factory=Counter)
    # Created in the app's lifecycle, on its event loop:
    fetcher: UrlFetcher | None = None
    batcher: Batcher | None = None
    decode_pool: ThreadPoolExecutor | None = None
    large_bodies: asyncio.Semaphore | None = None

    async def in_decode_thread(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, func, *args)

    async def start(self) -> None:
        """Decode threads, URL fetcher and batcher, on the running event loop."""
        config = self.config
        self.decode_pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="batchtag-decode")
        self.large_bodies = asyncio.Semaphore(config.large_body_slots)
        self.fetcher = UrlFetcher(
            timeout_s=config.url_timeout_s,
            max_bytes=config.url_max_bytes,
            allow_private=config.allow_private_urls,
        )
        await self.fetcher.start()
        self.batcher = Batcher(self.tagger, config.batch_max, config.batch_wait_ms)
        self.batcher.start()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        if self.fetcher is not None:
            await self.fetcher.close()
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=False, cancel_futures=True)


def create_state(config: ServeConfig, tagger: Tagger | None = None) -> ServerState:
    """Everything behind the HTTP layer (tagger, limits, quota); ``start()`` it on a loop."""
    tagger = (
        tagger
        if tagger is not None
        else load_tagger(
            config.tagger,
            config.lang,
            config.faces,
            stages=parse_stages(config.stages),
            min_confidence=config.min_confidence,
            int8=not config.float_classifier,
        )
    )
    return ServerState(
        config=config,
        tagger=tagger,
        credentials=CredentialStore(config.credentials),
        quota=QuotaLimiter(config.qps_limit),
        faults=FaultInjector(
            config.inject_latency_ms, config.inject_latency_jitter_ms, config.inject_error_rate
        ),
        limits=DecodeLimits(
            max_image_bytes=config.max_image_bytes,
            max_pixels=config.max_pixels,
            min_side=tagger.input_size,
        ),
        prepare=preparer(tagger),
    )


async def load_url(url: str, state: ServerState) -> Any:
    assert state.fetcher is not None
    data = await state.fetcher.fetch(url)
    try:
        return await state.in_decode_thread(decode_image_bytes, data, state.limits, state.prepare)
    except ApiError as exc:
        if exc.code in (codes.IMAGE_FORMAT, codes.IMAGE_EMPTY):
            raise ApiError(
                codes.IMAGE_DOWNLOAD_FAILED, "the url's content is not a JPG, PNG or BMP image"
            ) from None
        raise


async def tag_source(state: ServerState, image: bytes | None = None, url: str | None = None) -> list[Tag]:
    """The API's answer for raw image bytes or a url, without HTTP, JSON, base64, signature
    or quota: the embedded mode's in-process path. Decode, prepare, batch and tag are the
    same calls a POST makes; every failure is an ``ApiError`` with the code a POST answers."""
    try:
        if url:
            item = await load_url(url, state)
        elif image is not None:
            item = await state.in_decode_thread(decode_image_bytes, image, state.limits, state.prepare)
        else:
            raise ApiError(codes.NO_SOURCE)
        assert state.batcher is not None
        tags = await state.batcher.tag(item)
    except ApiError as exc:
        state.answered[exc.code] += 1
        raise
    except Exception:
        log.exception("internal error while tagging in process")
        state.answered[codes.INTERNAL_UNPACK] += 1
        raise ApiError(codes.INTERNAL_UNPACK, "internal error") from None
    state.answered[codes.OK] += 1
    return tags


def decode_image_bytes(data: bytes, limits: DecodeLimits, prepare: Prepare) -> Any:
    image = decode_image(data, limits)
    return image if prepare is None else prepare(image)


def decode_inline_image(text: str, limits: DecodeLimits, prepare: Prepare) -> Any:
    image = decode_image(decode_base64(text, limits.max_image_bytes), limits)
    return image if prepare is None else prepare(image)
