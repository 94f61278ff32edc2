"""The API surface of ``batchtag serve``: every error code from a real request, and success."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from batchtag import codes
from batchtag.server import RunningServer
from batchtag.signing import Credentials, sign, sign_plain
from tests.support import encode_image, signed_headers

OTHER = Credentials(appid="1000002", secret_id="AKIDotherSecretId002", secret_key="other-secret-key-0002")
URL_MAX_BYTES = 64 * 1024
URL_TIMEOUT_S = 0.5


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def url_target_app() -> web.Application:
    """A second local server the API downloads ``url`` sources from."""

    async def slow(request: web.Request) -> web.StreamResponse:
        """Trickles a byte every 50 ms for 5 s, so only a deadline on the whole download
        stops it, and only one shorter than the server's default (10 s): a download that
        completes is not an image (another code)."""
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"\xff")  # raises once the API has hung up
            await asyncio.sleep(0.05)
        return response

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"\0" * URL_MAX_BYTES)
        return response

    async def blue_png(_: web.Request) -> web.Response:
        return web.Response(body=encode_image("PNG", color="blue"), content_type="image/png")

    async def text(_: web.Request) -> web.Response:
        return web.Response(text="hello, not an image")

    async def missing(_: web.Request) -> web.Response:
        return web.Response(text="no such image", status=404)

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("/blue.png")

    app = web.Application()
    for path, handler in [("/blue.png", blue_png), ("/text", text), ("/missing", missing),
                          ("/redirect", redirect), ("/slow", slow), ("/big", big)]:  # fmt: skip
        app.router.add_get(path, handler)
    return app


@pytest.fixture
async def url_target() -> AsyncIterator[str]:
    runner = web.AppRunner(await url_target_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


@pytest.fixture
async def api_server(serve: Callable[..., Any], creds: Credentials) -> RunningServer:
    return await serve(
        credentials=[creds, OTHER],
        allow_private_urls=True,  # the url target is on loopback
        url_timeout_s=URL_TIMEOUT_S,
        url_max_bytes=URL_MAX_BYTES,
        max_image_bytes=256 * 1024,
        max_body_bytes=1024 * 1024,
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Case:
    """What a table row may use to build its request."""

    creds: Credentials
    target: str  # the url target's base url

    def body(self, **fields: Any) -> dict[str, Any]:
        return {"appid": self.creds.appid, "bucket": ""} | fields

    def headers(self, creds: Credentials | None = None, **sign_options: Any) -> dict[str, str]:
        return signed_headers(creds or self.creds, **sign_options)


JPEG = b64(encode_image("JPEG"))
Build = Callable[[Case], tuple[Any, dict[str, str]]]

ERROR_CASES: list[tuple[str, int, Build]] = [
    ("bad json", codes.BAD_REQUEST, lambda c: (b"{not json", c.headers())),
    ("body not an object", codes.BAD_REQUEST, lambda c: (b"[1, 2]", c.headers())),
    ("no authorization", codes.SIGNATURE_EMPTY, lambda c: (c.body(image=JPEG), {})),
    ("malformed signature", codes.SIGNATURE_MALFORMED, lambda c: (c.body(image=JPEG), {"Authorization": "!!"})),
    ("appid mismatch", codes.SIGNATURE_MISMATCH, lambda c: (c.body(image=JPEG), c.headers(OTHER))),
    ("bucket mismatch", codes.SIGNATURE_MISMATCH, lambda c: (c.body(image=JPEG, bucket="b1"), _bucket(c, "b2"))),
    ("expired", codes.SIGNATURE_EXPIRED, lambda c: (c.body(image=JPEG), _expired(c))),
    ("unknown appid", codes.APPID_UNKNOWN, lambda c: (c.body(appid="999", image=JPEG), c.headers())),
    ("unknown secret id", codes.SECRET_ID_UNKNOWN, lambda c: (c.body(image=JPEG), _unknown_secret_id(c))),
    ("wrong secret key", codes.SIGNATURE_FAILED, lambda c: (c.body(image=JPEG), _wrong_key(c))),
    ("neither image nor url", codes.NO_SOURCE, lambda c: (c.body(), c.headers())),
    ("image too large", codes.IMAGE_TOO_LARGE, lambda c: (c.body(image=b64(b"\xff" * 300_000)), c.headers())),
    ("appid not a string", codes.BAD_PARAMETER, lambda c: (c.body(appid=1000001, image=JPEG), c.headers())),
    ("appid missing", codes.BAD_PARAMETER, lambda c: ({"image": JPEG}, c.headers())),
    ("image not a string", codes.BAD_PARAMETER, lambda c: (c.body(image=123), c.headers())),
    ("url not a string", codes.BAD_PARAMETER, lambda c: (c.body(url=["http://x/"]), c.headers())),
    ("bucket not a string", codes.BAD_PARAMETER, lambda c: (c.body(bucket=5, image=JPEG), c.headers())),
    ("truncated image", codes.IMAGE_DECODE_FAILED, lambda c: (c.body(image=_truncated_png()), c.headers())),
    ("empty image", codes.IMAGE_EMPTY, lambda c: (c.body(image=""), c.headers())),
    ("bad base64", codes.IMAGE_FORMAT, lambda c: (c.body(image="not*base64!"), c.headers())),
    ("gif image", codes.IMAGE_FORMAT, lambda c: (c.body(image=b64(encode_image("GIF"))), c.headers())),
    ("text as image", codes.IMAGE_FORMAT, lambda c: (c.body(image=b64(b"hello world")), c.headers())),
    ("ftp url", codes.URL_FORMAT, lambda c: (c.body(url="ftp://example.com/a.jpg"), c.headers())),
    ("url without host", codes.URL_FORMAT, lambda c: (c.body(url="http:///a.jpg"), c.headers())),
    ("not a url", codes.URL_FORMAT, lambda c: (c.body(url="just words"), c.headers())),
    ("url 404", codes.URL_DOWNLOAD_FAILED, lambda c: (c.body(url=c.target + "/missing"), c.headers())),
    ("url not an image", codes.IMAGE_DOWNLOAD_FAILED, lambda c: (c.body(url=c.target + "/text"), c.headers())),
    ("url too big", codes.IMAGE_DOWNLOAD_FAILED, lambda c: (c.body(url=c.target + "/big"), c.headers())),
    ("url timeout", codes.URL_DOWNLOAD_TIMEOUT, lambda c: (c.body(url=c.target + "/slow"), c.headers())),
    ("url refused", codes.URL_UNREACHABLE, lambda c: (c.body(url=f"http://127.0.0.1:{closed_port()}/"), c.headers())),
    ("url wins over image", codes.URL_DOWNLOAD_FAILED, lambda c: (_both(c, "/missing", JPEG), c.headers())),
]  # fmt: skip


def _bucket(case: Case, bucket: str) -> dict[str, str]:
    return case.headers(bucket=bucket)


def _expired(case: Case) -> dict[str, str]:
    return case.headers(now=int(time.time()) - 3600, ttl=60)


def _unknown_secret_id(case: Case) -> dict[str, str]:
    return case.headers(Credentials(case.creds.appid, "AKIDnobodyHasThisOne", case.creds.secret_key))


def _wrong_key(case: Case) -> dict[str, str]:
    return case.headers(Credentials(case.creds.appid, case.creds.secret_id, "not-the-right-key"))


def _truncated_png() -> str:
    return b64(encode_image("PNG", size=(300, 300), color=(1, 2, 3))[:-40])


def _both(case: Case, path: str, image: str) -> dict[str, Any]:
    return case.body(url=case.target + path, image=image)


def assert_api_shape(body: Any) -> None:
    assert isinstance(body, dict)
    assert set(body) == {"code", "message", "tags"}
    assert isinstance(body["code"], int) and isinstance(body["message"], str)
    for tag in body["tags"]:
        assert set(tag) == {"tag_name", "tag_confidence"}
        assert isinstance(tag["tag_name"], str) and tag["tag_name"]
        assert isinstance(tag["tag_confidence"], int) and 0 <= tag["tag_confidence"] <= 100


@pytest.mark.parametrize(("code", "build"), [pytest.param(c, b, id=i) for i, c, b in ERROR_CASES])
async def test_error_codes(api_server, url_target, creds, detect, code: int, build: Build) -> None:
    body, headers = build(Case(creds, url_target))
    status, answer = await detect(api_server, body, headers)
    assert status == 200
    assert_api_shape(answer)
    assert (answer["code"], answer["tags"]) == (code, [])
    assert answer["message"].startswith(codes.message(code))


async def test_success_has_the_exact_response_shape(api_server, creds, detect) -> None:
    status, answer = await detect(api_server, {"appid": creds.appid, "image": JPEG}, signed_headers(creds))
    assert status == 200
    assert_api_shape(answer)
    assert answer["code"] == 0 and answer["message"] == "success"
    assert {"tag_name": "红", "tag_confidence": 100} in answer["tags"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
async def test_every_accepted_format_is_tagged(api_server, creds, detect, fmt: str) -> None:
    body = {"appid": creds.appid, "image": b64(encode_image(fmt, color="blue"))}
    _, answer = await detect(api_server, body, signed_headers(creds))
    assert answer["code"] == 0 and answer["tags"][0]["tag_name"] == "蓝"


async def test_url_source_and_its_redirects_are_followed(api_server, url_target, creds, detect) -> None:
    for path in ("/blue.png", "/redirect"):
        body = {"appid": creds.appid, "url": url_target + path, "image": "ignored: url wins"}
        _, answer = await detect(api_server, body, signed_headers(creds))
        assert answer["code"] == 0 and answer["tags"][0]["tag_name"] == "蓝", path


async def test_url_timeout_is_answered_within_the_timeout(api_server, url_target, creds, detect) -> None:
    started = time.monotonic()
    _, answer = await detect(
        api_server, {"appid": creds.appid, "url": url_target + "/slow"}, signed_headers(creds)
    )
    # the code says the configured timeout ended the trickle (the default one would not:
    # /slow finishes first); no upper bound in wall time, which a loaded machine can miss
    assert answer["code"] == codes.URL_DOWNLOAD_TIMEOUT
    assert time.monotonic() - started >= URL_TIMEOUT_S


async def test_over_quota_is_code_15(serve, creds, detect) -> None:
    server = await serve(qps_limit=1)
    body = {"appid": creds.appid, "image": JPEG}
    first = await detect(server, body, signed_headers(creds))
    second = await detect(server, body, signed_headers(creds))
    assert (first[1]["code"], second[1]["code"]) == (0, codes.RATE_LIMITED)
    assert second[1]["tags"] == []


# --- the signature, both ways -----------------------------------------------------------------


def _tamper_digest(authorization: str) -> str:
    raw = bytearray(base64.b64decode(authorization))
    raw[0] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def _tamper_plain_text(authorization: str) -> str:
    """Extend the expiry in the signed text but keep the original digest."""
    raw = base64.b64decode(authorization)
    digest, plain = raw[:20], raw[20:].decode()
    fields = dict(part.split("=", 1) for part in plain.split("&"))
    fields["e"] = str(int(fields["e"]) + 10**6)
    forged = "&".join(f"{key}={value}" for key, value in fields.items())
    return base64.b64encode(digest + forged.encode()).decode()


def _fields_in_any_order(creds: Credentials) -> str:
    now = int(time.time())
    plain = f"t={now}&e={now + 60}&r=7&u=0&k={creds.secret_id}&f=&b=&a={creds.appid}"
    return sign_plain(creds.secret_key, plain)


SIGNATURES: list[tuple[str, int, Callable[[Credentials], str]]] = [
    ("right key", codes.OK, lambda c: sign(c)),
    ("fields in any order", codes.OK, _fields_in_any_order),
    ("tampered digest", codes.SIGNATURE_FAILED, lambda c: _tamper_digest(sign(c))),
    ("tampered plain text", codes.SIGNATURE_FAILED, lambda c: _tamper_plain_text(sign(c))),
    ("expired", codes.SIGNATURE_EXPIRED, lambda c: sign(c, now=int(time.time()) - 700, ttl=600)),
    ("other secret key", codes.SIGNATURE_FAILED, lambda c: sign(Credentials(c.appid, c.secret_id, "other"))),
    ("other account", codes.SIGNATURE_MISMATCH, lambda _: sign(OTHER)),
]


@pytest.mark.parametrize(("code", "authorize"), [pytest.param(c, a, id=i) for i, c, a in SIGNATURES])
async def test_signature_is_verified(api_server, creds, detect, code: int, authorize) -> None:
    _, answer = await detect(
        api_server, {"appid": creds.appid, "image": JPEG}, {"Authorization": authorize(creds)}
    )
    assert answer["code"] == code
    assert bool(answer["tags"]) == (code == codes.OK)
