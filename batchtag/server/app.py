"""The aiohttp application: ``POST /v1/detection/imagetag_detect``, ``/healthz`` and ``/stats``.

A request is checked cheapest first, and nothing is read before the caller is known:
Authorization header (format, secret id, HMAC, expiry, lifetime, the account's bucket) ->
body size -> JSON -> field types -> appid known -> appid and bucket against the signature ->
quota -> image source -> decode -> tag. An unsigned or forged request is answered from its
head alone (aiohttp drains and drops the body it sent); large bodies are read and parsed a
few at a time (``large_body_slots``), so memory does not grow with the number of callers.
Every failure is an ``ApiError`` answered as HTTP 200 with the code table's message, the
API's convention, including bodies over ``max_body_bytes`` (code 20); only a body that does
not arrive within ``body_timeout_s`` (HTTP 408, connection closed) and the injected faults
(HTTP 503, or no answer at all) answer otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from PIL import Image

from batchtag import codes
from batchtag.api import DETECT_PATH, HEALTH_PATH
from batchtag.errors import ApiError, SignatureError, api_message
from batchtag.server.batcher import Batcher
from batchtag.server.config import ServeConfig
from batchtag.server.credentials import CredentialStore
from batchtag.server.faults import Fault, FaultInjector
from batchtag.server.imaging import DecodeLimits, decode_base64, decode_image
from batchtag.server.quota import QuotaLimiter
from batchtag.server.urlfetch import UrlFetcher
from batchtag.signing import SignedFields, check_body, verify_header
from batchtag.taggers import Tag, Tagger, load_tagger, parse_stages, preparer

log = logging.getLogger(__name__)

# The API code a request was answered with, for the access log (absent: no API answer).
API_CODE = web.RequestKey("batchtag_api_code", int)

# Parsing a multi-megabyte JSON body takes tens of milliseconds: do it off the event loop.
INLINE_JSON_LIMIT = 256 * 1024
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))

T = TypeVar("T")
# A tagger's ``prepare``, run in the decode thread right after decoding; None: pass the image on.
Prepare = Callable[[Image.Image], Any] | None


@dataclass(frozen=True)
class DetectRequest:
    appid: str
    bucket: str | None
    image: str | None
    url: str | None


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


STATE = web.AppKey("batchtag_state", ServerState)


def create_app(config: ServeConfig, tagger: Tagger | None = None) -> web.Application:
    """The API server for ``config``; loads the configured tagger unless one is given."""
    state = create_state(config, tagger)
    # aiohttp enforces client_max_size while reading; _read_json_object turns its 413 into code 20.
    app = web.Application(client_max_size=config.max_body_bytes)
    app[STATE] = state
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post(DETECT_PATH, handle_detect)
    app.router.add_get(HEALTH_PATH, handle_healthz)
    app.router.add_get("/stats", handle_stats)
    return app


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


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.start()
    try:
        yield
    finally:
        await state.close()


# --- handlers ------------------------------------------------------------------------------


async def handle_healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ready = state.batcher is not None and state.batcher.running
    body = {"status": "ok" if ready else "starting", "tagger": state.tagger.name}
    return web.json_response(body, status=200 if ready else 503)


async def handle_stats(request: web.Request) -> web.Response:
    """Counters for benchmarks: how well batching works and what was answered."""
    state = request.app[STATE]
    return web.json_response(
        {
            "tagger": state.tagger.name,
            "batching": state.batcher.stats.as_dict() if state.batcher else {},
            "responses": {str(code): count for code, count in sorted(state.answered.items())},
            "injected_faults": dict(state.faults.counts),
        }
    )


async def handle_detect(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    fault = state.faults.pick_fault()
    await state.faults.delay()
    if fault is not None:
        return await _answer_with_fault(request, fault)
    try:
        tags = await _detect(request, state)
    except ApiError as exc:
        return _answer(request, exc.code, exc.message)
    except web.HTTPRequestTimeout as timeout:
        return await _answer_and_close(request, timeout.status, timeout.text or "")
    except ConnectionError:
        # The client went away mid-request (a killed batchtag run, say): nothing to answer, not a bug.
        log.debug("client disconnected during %s", DETECT_PATH)
        return web.Response(status=499)
    except Exception:
        # Deliberately no request body or headers in the log: they carry images and signatures.
        log.exception("internal error while handling %s", DETECT_PATH)
        return _answer(request, codes.INTERNAL_UNPACK, api_message(codes.INTERNAL_UNPACK, "internal error"))
    return _answer(request, codes.OK, codes.message(codes.OK), tags)


def _answer(request: web.Request, code: int, message: str, tags: list[Tag] | None = None) -> web.Response:
    request.app[STATE].answered[code] += 1
    request[API_CODE] = code
    body = {"code": code, "message": message, "tags": tags or []}
    return web.json_response(body, dumps=functools.partial(json.dumps, ensure_ascii=False))


async def _answer_with_fault(request: web.Request, fault: Fault) -> web.StreamResponse:
    if fault is Fault.HTTP_503:
        return web.Response(status=503, text="503 Service Unavailable (injected fault)")
    if fault is Fault.CODE_203:
        return _answer(request, codes.INTERNAL_TIMEOUT, api_message(codes.INTERNAL_TIMEOUT, "injected fault"))
    await _discard_body(request)  # so the client sees a closed connection, not a failed send
    if request.transport is not None:
        request.transport.close()
    # Nothing can be written any more; aiohttp quietly gives up on this response.
    return web.Response(status=503)


async def _answer_and_close(request: web.Request, status: int, text: str) -> web.StreamResponse:
    """Answer, then close the connection at once instead of draining what the client still sends."""
    response = web.Response(status=status, text=text)
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()  # flushes the answer first
    return response


async def _discard_body(request: web.Request) -> None:
    with contextlib.suppress(web.HTTPException):
        await request.read()


# --- the request pipeline -------------------------------------------------------------------


async def _detect(request: web.Request, state: ServerState) -> list[Tag]:
    signed = _check_authorization(request.headers.get("Authorization"), state)
    body = await _read_json_object(request, state)
    fields = _parse_fields(body)
    del body  # whatever else a large body held need not live on through decoding
    _check_against_signature(fields, signed, state.credentials)
    if not state.quota.try_acquire(fields.appid):
        raise ApiError(codes.RATE_LIMITED, f"over the quota of {state.quota.limit:g} requests per second")
    item = await _load_image(fields, state)
    assert state.batcher is not None
    return await state.batcher.tag(item)


def _check_authorization(authorization: str | None, state: ServerState) -> SignedFields:
    """All the header alone can prove, before a byte of the body is read."""
    try:
        signed, _creds = verify_header(
            authorization,
            state.credentials.lookup_secret,
            max_lifetime_s=state.config.max_signature_lifetime_s,
            appid_exists=state.credentials.knows_appid,
        )
    except SignatureError as exc:
        raise _as_api_error(exc) from None
    return signed


def _check_against_signature(fields: DetectRequest, signed: SignedFields, store: CredentialStore) -> None:
    if not store.knows_appid(fields.appid):
        raise ApiError(codes.APPID_UNKNOWN)
    try:
        check_body(signed, fields.appid, fields.bucket)
    except SignatureError as exc:
        raise _as_api_error(exc) from None


def _as_api_error(exc: SignatureError) -> ApiError:
    return ApiError(exc.code, exc.detail)


async def _read_json_object(request: web.Request, state: ServerState) -> dict[str, Any]:
    limit = state.config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(codes.IMAGE_TOO_LARGE, f"request body over {limit} bytes")
    length = request.content_length
    if length is not None and length <= INLINE_JSON_LIMIT:
        return _parse_json_object(await _read_body(request, state))
    assert state.large_bodies is not None
    async with state.large_bodies:
        raw = await _read_body(request, state)
        return await state.in_decode_thread(_parse_json_object, raw)


async def _read_body(request: web.Request, state: ServerState) -> bytes:
    try:
        async with asyncio.timeout(state.config.body_timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            codes.IMAGE_TOO_LARGE, f"request body over {state.config.max_body_bytes} bytes"
        ) from None
    except TimeoutError:
        timeout = state.config.body_timeout_s
        raise web.HTTPRequestTimeout(text=f"request body not received within {timeout:g} s") from None


def _parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(codes.BAD_REQUEST, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(codes.BAD_REQUEST, "body must be a JSON object")
    return body


def _parse_fields(body: dict[str, Any]) -> DetectRequest:
    appid = body.get("appid")
    if appid is None or appid == "":
        raise ApiError(codes.BAD_PARAMETER, "appid is required")
    if not isinstance(appid, str):
        raise ApiError(codes.BAD_PARAMETER, "appid must be a string")
    for name in ("bucket", "image", "url"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise ApiError(codes.BAD_PARAMETER, f"{name} must be a string")
    return DetectRequest(appid, body.get("bucket"), body.get("image"), body.get("url"))


async def _load_image(fields: DetectRequest, state: ServerState) -> Any:
    """The url when one is given (it wins over image, as the API says), else the image.

    Decoded and then prepared for the tagger (``Tagger.prepare``) in one decode-thread call;
    the result is what the batcher hands to ``tag_batch``.
    """
    if fields.url:
        return await _load_url(fields.url, state)
    if fields.image is not None:
        return await state.in_decode_thread(_decode_inline_image, fields.image, state.limits, state.prepare)
    raise ApiError(codes.NO_SOURCE)


async def _load_url(url: str, state: ServerState) -> Any:
    assert state.fetcher is not None
    data = await state.fetcher.fetch(url)
    try:
        return await state.in_decode_thread(_decode_image_bytes, data, state.limits, state.prepare)
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
            item = await _load_url(url, state)
        elif image is not None:
            item = await state.in_decode_thread(_decode_image_bytes, image, state.limits, state.prepare)
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


def _decode_image_bytes(data: bytes, limits: DecodeLimits, prepare: Prepare) -> Any:
    image = decode_image(data, limits)
    return image if prepare is None else prepare(image)


def _decode_inline_image(text: str, limits: DecodeLimits, prepare: Prepare) -> Any:
    image = decode_image(decode_base64(text, limits.max_image_bytes), limits)
    return image if prepare is None else prepare(image)
