"""The embedded endpoint: `batchtag run` with no endpoint starts this server inside itself,
on a free loopback port with throwaway credentials, so a local run travels the same HTTP
path as a remote one."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from batchtag.server.config import ServeConfig
from batchtag.server.credentials import throwaway_credentials
from batchtag.server.runner import start_server
from batchtag.signing import Credentials


@contextlib.asynccontextmanager
async def embedded_endpoint(tagger: str, lang: str) -> AsyncIterator[tuple[str, Credentials]]:
    """(base URL, credentials) of a server that lives as long as the context."""
    credentials = throwaway_credentials()
    config = ServeConfig(host="127.0.0.1", port=0, tagger=tagger, lang=lang, credentials=[credentials])
    server = await start_server(config)
    try:
        yield server.url, credentials
    finally:
        await server.close()
