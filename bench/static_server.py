"""A tiny image host for URL sources: answers every GET with the same JPEG.

    python -m bench.static_server PORT FILE

Runs until SIGTERM/SIGINT; binds 127.0.0.1 only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web


def main(argv: list[str]) -> None:
    port, path = int(argv[0]), Path(argv[1])
    data = path.read_bytes()

    async def image(_: web.Request) -> web.Response:
        return web.Response(body=data, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{tail:.*}", image)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main(sys.argv[1:])
