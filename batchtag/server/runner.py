"""Running the app: in-process for tests and the client's embedded mode, or in the foreground."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from batchtag.server.app import API_CODE, create_app
from batchtag.server.config import ServeConfig
from batchtag.taggers import Tagger

log = logging.getLogger("batchtag.server")
access_log = logging.getLogger("batchtag.server.access")


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, route, HTTP status, API code, elapsed ms.

    Deliberately nothing a client controls beyond the method: no headers (signatures), no
    query string, no body, and not even the raw path (a 404 path is arbitrary client text);
    the path logged is the matched route's template, or ``(no route)``.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route = getattr(request, "match_info", None)
        resource = route.route.resource if route is not None else None
        path = resource.canonical if resource is not None else "(no route)"
        code = request.get(API_CODE)
        self.logger.info(
            "%s %s %d code=%s %.1f ms",
            request.method,
            path,
            response.status,
            "-" if code is None else code,
            time * 1000,
        )


@dataclass
class RunningServer:
    url: str  # e.g. "http://127.0.0.1:54321", no trailing slash
    config: ServeConfig
    app: web.Application
    _runner: web.AppRunner

    async def close(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> RunningServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_server(config: ServeConfig, tagger: Tagger | None = None) -> RunningServer:
    """Listen on ``config.host:config.port`` (0 = a free port); ready to tag on return.

    The tagger is loaded before the socket opens, so a client that sees the port can use it.
    """
    app = create_app(config, tagger)
    # Access log only when asked for (`serve -v`): at benchmark rates it costs real CPU.
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=access_log if config.access_log else None,
        access_log_class=AccessLogger,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    return RunningServer(url=_base_url(host, port), config=config, app=app, _runner=runner)


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_forever(config: ServeConfig) -> None:
    """``batchtag serve``: run until SIGINT or SIGTERM, then shut down cleanly."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if log.getEffectiveLevel() > logging.INFO:
        # The "serving on" line is the only way to learn a port-0 address: keep it visible
        # even when the CLI keeps everything else at WARNING.
        log.setLevel(logging.INFO)
    asyncio.run(_serve_until_signalled(config))


async def _serve_until_signalled(config: ServeConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if not config.credentials:
        log.warning("no credentials configured: every request will be refused (code 10)")
    server = await start_server(config)
    try:
        log.info("serving on %s (tagger=%s, lang=%s)", server.url, config.tagger, config.lang)
        await stop.wait()
        log.info("shutting down")
    finally:
        await server.close()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
