"""Fixtures shared by the test files; the helpers they wrap live in tests/support.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from batchtag.api import DETECT_PATH
from batchtag.server import RunningServer, ServeConfig, start_server, urlfetch
from batchtag.signing import Credentials
from tests.support import CREDENTIALS, Spawner, encode_image, signed_headers


@pytest.fixture
def creds() -> Credentials:
    return CREDENTIALS


@pytest.fixture
def make_image() -> Callable[..., bytes]:
    return encode_image


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


@pytest.fixture
def spawner(tmp_path: Any) -> Any:
    """Subprocesses (servers, runs) that are all ended when the test ends."""
    spawned = Spawner(tmp_path)
    yield spawned
    spawned.close()


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every hop the url fetcher tries to connect to (the SSRF tests assert it stays empty)."""
    attempted: list[str] = []
    real_get_one = urlfetch.UrlFetcher._get_one

    async def recording_get_one(self: urlfetch.UrlFetcher, url: Any) -> Any:
        attempted.append(str(url))
        return await real_get_one(self, url)

    monkeypatch.setattr(urlfetch.UrlFetcher, "_get_one", recording_get_one)
    return attempted


from tests.export_helpers import tagged_photos  # noqa: E402, F401  (session fixture: one real run)
