"""Fixtures shared by the test files: credentials, signed headers, images, a running server."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from PIL import Image

from batchtag.api import DETECT_PATH
from batchtag.config import RunConfig
from batchtag.server import RunningServer, ServeConfig, start_server
from batchtag.signing import Credentials, sign

TEST_CREDENTIALS = Credentials(
    appid="1000001", secret_id="AKIDtestSecretId0001", secret_key="test-secret-key-0001"
)


@pytest.fixture
def creds() -> Credentials:
    return TEST_CREDENTIALS


def encode_image(fmt: str = "JPEG", size: tuple[int, int] = (64, 48), color: Any = (200, 30, 30)) -> bytes:
    """A solid-colour image file in ``fmt`` (JPEG, PNG, BMP, GIF, ...)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def make_image() -> Callable[..., bytes]:
    return encode_image


def signed_headers(creds: Credentials, bucket: str = "", **sign_options: Any) -> dict[str, str]:
    """Headers for one API request; ``sign_options`` go to ``signing.sign`` (ttl, now, rand)."""
    return {"Authorization": sign(creds, bucket, **sign_options), "Content-Type": "application/json"}


@pytest.fixture
def sign_headers() -> Callable[..., dict[str, str]]:
    return signed_headers


@pytest.fixture
async def serve(creds: Credentials) -> AsyncIterator[Callable[..., Awaitable[RunningServer]]]:
    """Start servers on a free loopback port (color tagger, ``creds``); all closed afterwards.

    ``await serve(qps_limit=5)`` overrides ServeConfig fields; ``tagger=`` passes a Tagger object.
    """
    started: list[RunningServer] = []

    async def start(tagger: Any = None, **overrides: Any) -> RunningServer:
        options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "tagger": "color", "credentials": [creds]}
        server = await start_server(ServeConfig(**(options | overrides)), tagger)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        await server.close()


@pytest.fixture
async def color_server(serve: Callable[..., Awaitable[RunningServer]]) -> RunningServer:
    return await serve()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def detect(http: aiohttp.ClientSession) -> Callable[..., Awaitable[tuple[int, Any]]]:
    """``await detect(server, body, headers)``: (HTTP status, JSON body or text).

    ``body`` is a dict (sent as JSON) or raw bytes.
    """

    async def call(
        server: RunningServer, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else None
        payload = None if isinstance(body, bytes) else body
        async with http.post(server.url + DETECT_PATH, json=payload, data=data, headers=headers) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    return call


def run_config(
    server: RunningServer, creds: Credentials, sources: list[Any], out: Any, **overrides: Any
) -> RunConfig:
    """A RunConfig against ``server``: the settings end-to-end tests share, overridable."""
    options: dict[str, Any] = {
        "sources": [str(s) for s in sources],
        "out": str(out),
        "endpoint": server.url,
        "appid": creds.appid,
        "secret_id": creds.secret_id,
        "secret_key": creds.secret_key,
        "concurrency": 8,
        "retries": 3,
        "timeout": 10.0,
        "progress": False,
    }
    return RunConfig(**(options | overrides))


@pytest.fixture
def spawner(tmp_path: Any) -> Any:
    """Subprocesses (servers, runs) that are all ended when the test ends."""
    from tests.hardening_helpers import Spawner

    spawned = Spawner(tmp_path)
    yield spawned
    spawned.close()
