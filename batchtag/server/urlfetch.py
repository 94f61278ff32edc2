"""Downloading ``url`` sources without becoming a proxy into the server's own network.

Every hop (the first URL and each redirect, followed by hand, at most five) is checked:
http/https with a host, and the address it points at must be public. IP literals, in
every numeric form the OS accepts, are checked before any connection is made; host names are checked by ``GuardedResolver``
after DNS resolution, and aiohttp connects only to the addresses that resolver returned,
so a name cannot resolve to a public address for the check and a private one for the
connection. Refusals answer code -1505 (url format wrong, permanent: retrying cannot
help) with the detail "url points at a private address".

The download is bounded in time (``url_timeout_s`` for the whole chain, including a
server that never finishes sending) and size (streamed, abandoned at ``url_max_bytes``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from batchtag import codes
from batchtag.errors import ApiError

MAX_REDIRECTS = 5
MAX_URL_LENGTH = 8192
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_SIZE = 64 * 1024
PRIVATE_ADDRESS_DETAIL = (
    "url points at a private address (loopback, private, link-local or reserved); "
    "batchtag serve --allow-private-urls fetches them"
)
USER_AGENT = "batchtag-server (image-tag API)"


class ForbiddenAddressError(OSError):
    """Raised by the resolver; aiohttp wraps OSErrors from resolvers, keeping this as the cause."""


# IPv6 ranges whose addresses carry an IPv4 address that traffic ends up at (or may):
NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are it
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a site's own translators
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # RFC 4291, deprecated
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_forbidden_address(address: str) -> bool:
    """Anything but a public unicast address: loopback, private, link-local, multicast, ...

    IPv6 forms that embed an IPv4 address are judged by it too, whatever the Python
    version's tables say: IPv4-mapped and NAT64 (64:ff9b::/96) by the embedded address,
    6to4 (2002::/16) by both; IPv4-compatible and local-use NAT64 are refused outright.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True  # not an address we understand: refuse rather than guess
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _is_forbidden_ip(ip.ipv4_mapped)
        if ip in NAT64_WELL_KNOWN:
            return _is_forbidden_ip(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in NAT64_LOCAL or ip in IPV4_COMPATIBLE:
            return True
        if ip.sixtofour is not None and _is_forbidden_ip(ip.sixtofour):
            return True
    return _is_forbidden_ip(ip)


def _is_forbidden_ip(ip: IpAddress) -> bool:
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


class GuardedResolver(AbstractResolver):
    """DNS resolution that refuses names pointing at any non-public address."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        # Refuse if any address is private, so the connection attempt order cannot matter.
        if not self._allow_private and any(is_forbidden_address(r["host"]) for r in results):
            raise ForbiddenAddressError(PRIVATE_ADDRESS_DETAIL)
        return results

    async def close(self) -> None:
        await self._inner.close()


def parse_source_url(raw: str) -> URL:
    """A URL we are willing to fetch from, or ApiError -1505."""
    if len(raw) > MAX_URL_LENGTH:
        raise ApiError(codes.URL_FORMAT, "url too long")
    try:
        url = URL(raw.strip())
        scheme, host, _ = url.scheme, url.host, url.port  # .port validates the number
    except (ValueError, TypeError, UnicodeError):
        raise ApiError(codes.URL_FORMAT, "not a valid url") from None
    if scheme not in ("http", "https"):
        raise ApiError(codes.URL_FORMAT, "only http and https urls are supported")
    if not host:
        raise ApiError(codes.URL_FORMAT, "url has no host")
    return url


def literal_address(host: str) -> str | None:
    """The address a URL host names by itself, or None for a name to resolve.

    Besides standard IPv4 and IPv6 literals this knows every form the OS's own parser
    (``inet_aton``) takes as an IPv4 address: ``2130706433``, ``0177.0.0.1``, ``127.1``,
    ``0x7f.1``, ... Older aiohttp versions passed such hosts straight to ``connect()``
    without asking the resolver, so they must be classified here, before any connection.
    """
    bare = host.strip("[]").split("%", 1)[0]
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(bare))
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None


class UrlFetcher:
    """One client session per server; ``fetch`` maps every failure to an API code."""

    def __init__(self, *, timeout_s: float, max_bytes: int, allow_private: bool) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.allow_private = allow_private
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allow_private), limit=64)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),  # our own deadline covers the whole chain
            headers={"User-Agent": USER_AGENT, "Accept": "image/*"},
            trust_env=False,  # never route through a proxy picked up from the environment
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, raw_url: str) -> bytes:
        url = parse_source_url(raw_url)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._follow_redirects(url)
        except TimeoutError:
            raise ApiError(
                codes.URL_DOWNLOAD_TIMEOUT, f"no complete answer within {self.timeout_s:g}s"
            ) from None

    async def _follow_redirects(self, url: URL) -> bytes:
        for _hop in range(MAX_REDIRECTS + 1):
            self._check_literal_host(url)
            next_url, body = await self._get_one(url)
            if next_url is None:
                return body
            url = next_url
        raise ApiError(codes.URL_DOWNLOAD_FAILED, f"more than {MAX_REDIRECTS} redirects")

    def _check_literal_host(self, url: URL) -> None:
        """IP literals bypass the resolver, so they are checked here, before connecting."""
        address = literal_address(url.host or "")
        if address is not None and not self.allow_private and is_forbidden_address(address):
            raise ApiError(codes.URL_FORMAT, PRIVATE_ADDRESS_DETAIL)

    async def _get_one(self, url: URL) -> tuple[URL | None, bytes]:
        """One hop: (the redirect target, b"") or (None, the body)."""
        assert self._session is not None, "UrlFetcher.start() was not called"
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status in REDIRECT_STATUSES:
                    return _redirect_target(url, response), b""
                if not 200 <= response.status < 300:
                    raise ApiError(codes.URL_DOWNLOAD_FAILED, f"the url answered HTTP {response.status}")
                return None, await self._read_capped(response)
        except aiohttp.ClientConnectorError as exc:
            raise _connect_error(exc) from None
        except aiohttp.InvalidURL:
            raise ApiError(codes.URL_FORMAT, "not a valid url") from None
        except aiohttp.ClientError as exc:
            raise ApiError(
                codes.URL_DOWNLOAD_FAILED, f"download interrupted ({type(exc).__name__})"
            ) from None

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        too_big = ApiError(codes.IMAGE_DOWNLOAD_FAILED, f"the url's body is over {self.max_bytes} bytes")
        if response.content_length is not None and response.content_length > self.max_bytes:
            raise too_big
        chunks: list[bytes] = []
        received = 0
        async for chunk in response.content.iter_chunked(CHUNK_SIZE):
            received += len(chunk)
            if received > self.max_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)


def _redirect_target(current: URL, response: aiohttp.ClientResponse) -> URL:
    location = response.headers.get("Location")
    if not location:
        raise ApiError(codes.URL_DOWNLOAD_FAILED, f"HTTP {response.status} redirect without a Location")
    try:
        target = current.join(URL(location))
    except (ValueError, TypeError):
        raise ApiError(codes.URL_FORMAT, "redirect to an invalid url") from None
    return parse_source_url(str(target))


def _connect_error(exc: aiohttp.ClientConnectorError) -> ApiError:
    cause: Any = exc.os_error
    if isinstance(cause, ForbiddenAddressError):
        return ApiError(codes.URL_FORMAT, PRIVATE_ADDRESS_DETAIL)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return ApiError(codes.URL_UNREACHABLE, "the url's host name does not resolve")
    return ApiError(codes.URL_UNREACHABLE, "cannot connect to the url's server")
