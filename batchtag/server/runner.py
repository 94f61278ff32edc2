"""Running the app: in-process for tests and the client's embedded mode, or in the foreground."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from batchtag.interrupts import SIGNALS, hard_exit, ignore_signals
from batchtag.server.app import API_CODE, create_app
from batchtag.server.config import ServeConfig
from batchtag.taggers import Tagger

log = logging.getLogger("batchtag.server")
access_log = logging.getLogger("batchtag.server.access")
# What aiohttp's HTTP layer reports (malformed requests, unhandled errors) goes here, through
# the filter below, instead of to "aiohttp.server".
http_log = logging.getLogger("batchtag.server.http")

# Methods the access log names; anything else a client sends is logged as "OTHER".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, route, HTTP status, API code, elapsed ms.

    Deliberately nothing a client controls: no headers (signatures), no query string, no
    body, not the raw path (a 404 path is arbitrary client text) and no unknown method
    name; the path logged is the matched route's template, ``(no route)``, or
    ``(malformed request)`` for one aiohttp could not parse (it never reached the router).
    Logging must never cost the request: any failure here becomes a fixed line.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        try:
            line = describe_request(request, response.status, time)
        except Exception:
            line = f"(request not describable) {response.status}"
        self.logger.info("%s", line)


def describe_request(request: web.BaseRequest, status: int, elapsed_s: float) -> str:
    # ``match_info`` asserts on a request that never reached the router; its slot does not.
    match_info = getattr(request, "_match_info", None)
    if match_info is None:
        return f"(malformed request) {status} {elapsed_s * 1000:.1f} ms"
    route = match_info.route
    resource = route.resource if route is not None else None
    path = resource.canonical if resource is not None else "(no route)"
    method = request.method if request.method in KNOWN_METHODS else "OTHER"
    code = request.get(API_CODE)
    return f"{method} {path} {status} code={'-' if code is None else code} {elapsed_s * 1000:.1f} ms"


class QuietMalformedRequests(logging.Filter):
    """Drops aiohttp's report of a request it could not parse.

    That report is a traceback whose message quotes the raw request line or header (query
    strings, signatures): client text that must not reach a log. The client got its 400;
    with ``-v`` the access log still records the request as one short line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


http_log.addFilter(QuietMalformedRequests())


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
        logger=http_log,
        # Closes connections idle between requests and those that never finish a request head.
        keepalive_timeout=config.idle_timeout_s,
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
    for signum in SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    if not config.credentials:
        log.warning("no credentials configured: every request will be refused (code 10)")
    server = await start_server(config)
    try:
        log.info("serving on %s (tagger=%s, lang=%s)", server.url, config.tagger, config.lang)
        await stop.wait()
        log.info("shutting down")
    finally:
        for signum in SIGNALS:
            loop.add_signal_handler(signum, stop_at_once)
        await server.close()
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
        # remove_signal_handler puts the default action back: a late SIGTERM after a clean
        # stop would end the process as -15. Stopped is stopped: later signals change nothing.
        ignore_signals()


def stop_at_once() -> None:
    """A second signal while in-flight requests drain: the user does not want to wait."""
    log.warning("second signal: stopping now, without waiting for requests in flight")
    hard_exit()
