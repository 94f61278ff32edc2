"""What untrusted input must never do: reach private networks, exhaust memory, or crash the server."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from batchtag import codes
from batchtag.api import DETECT_PATH
from batchtag.server import RunningServer, urlfetch
from batchtag.server.app import STATE
from batchtag.signing import Credentials
from tests.support import encode_image, signed_headers


async def start_site(app: web.Application, host: str = "127.0.0.1") -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, 0).start()
    port = runner.addresses[0][1]
    return runner, f"http://{host}:{port}"


class ImageHost:
    """A loopback image server that counts every request it receives."""

    def __init__(self) -> None:
        self.hits = 0
        self.app = web.Application()
        self.app.router.add_get("/blue.png", self.image)
        self.app.router.add_get("/to/{target:.+}", self.redirect)

    async def image(self, _: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(body=encode_image("PNG", color="blue"), content_type="image/png")

    async def redirect(self, request: web.Request) -> web.Response:
        self.hits += 1
        raise web.HTTPFound(request.match_info["target"])


@pytest.fixture
async def image_host() -> AsyncIterator[tuple[ImageHost, str]]:
    host = ImageHost()
    runner, url = await start_site(host.app)
    yield host, url
    await runner.cleanup()


def url_body(creds: Credentials, url: str) -> dict[str, str]:
    return {"appid": creds.appid, "url": url}


# --- the url guard ----------------------------------------------------------------------------


async def test_loopback_url_is_refused_by_default(serve, creds, detect, image_host) -> None:
    host, base = image_host
    server = await serve()
    for url in (base + "/blue.png", base.replace("127.0.0.1", "localhost") + "/blue.png"):
        _, answer = await detect(server, url_body(creds, url), signed_headers(creds))
        assert answer["code"] == codes.URL_FORMAT, url
        assert "private address" in answer["message"]
    assert host.hits == 0


async def test_loopback_url_is_allowed_with_allow_private_urls(serve, creds, detect, image_host) -> None:
    host, base = image_host
    server = await serve(allow_private_urls=True)
    _, answer = await detect(server, url_body(creds, base + "/blue.png"), signed_headers(creds))
    assert answer["code"] == codes.OK
    assert host.hits == 1


@pytest.fixture
def loopback_1_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend 127.0.0.1 is a public host, so it can stand in for one that redirects inward."""
    real_check = urlfetch.is_forbidden_address
    monkeypatch.setattr(urlfetch, "is_forbidden_address", lambda a: a != "127.0.0.1" and real_check(a))


@pytest.fixture
async def inner_host() -> AsyncIterator[tuple[ImageHost, str]]:
    """An image server on 127.0.0.2: private even while 127.0.0.1 pretends to be public."""
    host = ImageHost()
    runner, url = await start_site(host.app, "127.0.0.2")
    yield host, url
    await runner.cleanup()


@pytest.mark.usefixtures("loopback_1_is_public")
async def test_redirect_to_a_private_address_is_refused(serve, creds, detect, image_host, inner_host) -> None:
    outer, outer_url = image_host
    inner, inner_url = inner_host
    server = await serve()
    _, answer = await detect(
        server, url_body(creds, f"{outer_url}/to/{inner_url}/blue.png"), signed_headers(creds)
    )
    assert answer["code"] == codes.URL_FORMAT and "private address" in answer["message"]
    assert (outer.hits, inner.hits) == (1, 0)
    # The same chain works when private targets are allowed, so the refusal above was the guard's.
    server = await serve(allow_private_urls=True)
    _, answer = await detect(
        server, url_body(creds, f"{outer_url}/to/{inner_url}/blue.png"), signed_headers(creds)
    )
    assert answer["code"] == codes.OK and inner.hits == 1


PRIVATE_LITERALS = [
    "http://10.1.2.3/a.jpg",
    "http://192.168.1.1/a.jpg",
    "http://172.16.0.1/a.jpg",
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:9/a.jpg",
    "http://0.0.0.0/a.jpg",
    "http://224.0.0.1/a.jpg",
    "http://[::1]/a.jpg",
    "http://[fe80::1]/a.jpg",
    "http://[fd00::1]/a.jpg",
    "https://[::ffff:10.0.0.1]/a.jpg",
]


@pytest.mark.parametrize("url", PRIVATE_LITERALS)
async def test_private_ip_literals_are_refused_before_connecting(
    color_server, creds, detect, connections, url
) -> None:
    _, answer = await detect(color_server, url_body(creds, url), signed_headers(creds))
    assert answer["code"] == codes.URL_FORMAT and "private address" in answer["message"]
    assert connections == []  # refused before any connection (no wall-clock bound)


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [("8.8.8.8", False), ("2606:4700:4700::1111", False), ("100.64.0.1", True), ("::", True),
     ("240.0.0.1", True), ("::ffff:127.0.0.1", True), ("fe80::1%eth0", True), ("nonsense", True)],
)  # fmt: skip
def test_address_policy(address: str, forbidden: bool) -> None:
    assert urlfetch.is_forbidden_address(address) is forbidden


# --- hostile images and bodies ----------------------------------------------------------------


def png_bytes(mode: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


@pytest.mark.parametrize(("mode", "size"), [("1", (20000, 20000)), ("L", (8000, 8000))])
async def test_decompression_bomb_is_refused_cleanly(color_server, creds, detect, http, mode, size) -> None:
    bomb = png_bytes(mode, size)
    assert len(bomb) < 100_000
    body = {"appid": creds.appid, "image": base64.b64encode(bomb).decode()}
    status, answer = await detect(color_server, body, signed_headers(creds))
    assert status == 200 and answer["code"] == codes.IMAGE_TOO_LARGE
    assert "pixel" in answer["message"]
    async with http.get(color_server.url + "/healthz") as response:
        assert response.status == 200


async def _chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_limit_is_code_20(serve, creds, http, chunked: bool) -> None:
    server: RunningServer = await serve(max_body_bytes=256 * 1024)
    body = b'{"appid": "%s", "image": "%s"}' % (creds.appid.encode(), b"A" * 1024 * 1024)
    data: Any = _chunks(body) if chunked else body
    async with http.post(server.url + DETECT_PATH, data=data, headers=signed_headers(creds)) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["code"] == codes.IMAGE_TOO_LARGE and answer["tags"] == []
    async with http.get(server.url + "/healthz") as response:
        assert response.status == 200


async def test_never_ending_url_times_out(serve, creds, detect) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(100):  # 5 s: shorter than the default timeout (10 s), longer than 0.3 s
            await response.write(b"\x89")
            await asyncio.sleep(0.05)
        return response

    app = web.Application()
    app.router.add_get("/endless.png", trickle)
    runner, base = await start_site(app)
    try:
        server = await serve(allow_private_urls=True, url_timeout_s=0.3)
        _, answer = await detect(server, url_body(creds, base + "/endless.png"), signed_headers(creds))
        # the 0.3 s timeout ended it: a completed download is not an image (another code),
        # and the default timeout would come after the trickle's end
        assert answer["code"] == codes.URL_DOWNLOAD_TIMEOUT
    finally:
        await runner.cleanup()


class BrokenTagger:
    name = "broken"
    input_size = None
    max_batch = 4

    def tag_batch(self, images: list[Image.Image]) -> list[list[Any]]:
        raise RuntimeError("model exploded")


async def test_internal_errors_are_generic_and_logged_without_secrets(serve, creds, detect, caplog) -> None:
    server = await serve(tagger=BrokenTagger())
    caplog.set_level("DEBUG")
    image = base64.b64encode(encode_image("PNG")).decode()
    headers = signed_headers(creds)
    status, answer = await detect(server, {"appid": creds.appid, "image": image}, headers)
    assert status == 200 and answer["code"] == codes.INTERNAL_UNPACK and answer["tags"] == []
    assert "exploded" not in answer["message"]
    assert "model exploded" in caplog.text  # the operator still learns what happened
    for secret in (creds.secret_key, headers["Authorization"], image[:40]):
        assert secret not in caplog.text
    assert creds.secret_key not in repr(server.config)


async def test_access_log_is_one_line_a_request_without_secrets(serve, creds, http, caplog) -> None:
    caplog.set_level("INFO", logger="batchtag.server.access")
    quiet = await serve()
    async with http.get(quiet.url + "/healthz") as response:
        assert response.status == 200
    assert not [r for r in caplog.records if r.name == "batchtag.server.access"]  # off by default

    server = await serve(access_log=True)
    image = base64.b64encode(encode_image("PNG")).decode()
    headers = signed_headers(creds) | {"X-Secret": creds.secret_key}
    body = {"appid": creds.appid, "image": image, "note": creds.secret_key}
    async with http.post(f"{server.url}{DETECT_PATH}?k={creds.secret_key}", json=body, headers=headers) as r:
        assert (await r.json())["code"] == codes.OK
    async with http.post(server.url + DETECT_PATH, json={"appid": ""}, headers=headers) as r:
        assert (await r.json())["code"] == codes.BAD_PARAMETER
    async with http.get(f"{server.url}/nothing/{creds.secret_key}", headers=headers) as r:
        assert r.status == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "batchtag.server.access"]
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"POST {DETECT_PATH} 200 code=0 ") and lines[0].endswith(" ms")
    assert lines[1].startswith(f"POST {DETECT_PATH} 200 code={codes.BAD_PARAMETER} ")
    assert lines[2].startswith("GET (no route) 404 code=- ")  # a 404 path is client text: not logged
    assert not any("?" in line for line in lines)  # no query string
    for secret in (creds.secret_key, headers["Authorization"], image[:40]):
        assert secret not in caplog.text


async def test_a_client_that_disconnects_mid_body_is_not_an_internal_error(serve, creds, http, caplog):
    caplog.set_level(logging.DEBUG, logger="batchtag.server")
    server = await serve()
    host, port = server.url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    # Signed, so the server goes on to read the body (an unsigned request is refused first).
    authorization = signed_headers(creds)["Authorization"].encode()
    writer.write(
        b"POST " + DETECT_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + authorization + b"\r\n"
        b"Content-Length: 100000\r\n\r\n" + b'{"appid": "' + creds.appid.encode() + b'", "image": "AAAA'
    )
    await writer.drain()
    writer.close()  # gone before the body is complete
    await writer.wait_closed()
    # Readiness signal: the handler saw the disconnect (its debug line), so any internal
    # error it was going to log would be logged by now.
    deadline = time.monotonic() + 10
    while "client disconnected" not in caplog.text:
        assert time.monotonic() < deadline, "the server never noticed the disconnect"
        await asyncio.sleep(0.01)
    async with http.get(server.url + "/healthz") as response:
        assert response.status == 200
    assert "internal error" not in caplog.text and server.app[STATE].answered[codes.INTERNAL_UNPACK] == 0
