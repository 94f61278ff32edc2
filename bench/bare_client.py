"""The least a Python client can do per request: the baseline for batchtag's client CPU.

    python -m bench.bare_client URL MANIFEST CONCURRENCY     # prints {"requests": N, "ok": K}

One aiohttp session, CONCURRENCY tasks taking files from one list; per file: read it (plain
blocking read), base64, ``json.dumps`` of the body, POST with one signature made at start
(valid an hour), read and ``json.loads`` the answer. No retries, pacing, records or resume.
Credentials come from the environment like ``batchtag run``'s.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path

import aiohttp

from batchtag import api
from batchtag.signing import Credentials, sign


async def main(url: str, manifest: str, concurrency: int) -> dict[str, int]:
    credentials = Credentials(
        os.environ["BATCHTAG_APPID"], os.environ["BATCHTAG_SECRET_ID"], os.environ["BATCHTAG_SECRET_KEY"]
    )
    headers = {"Content-Type": "application/json", "Authorization": sign(credentials, ttl=3600)}
    paths = iter(Path(manifest).read_text(encoding="utf-8").split())
    counts = {"requests": 0, "ok": 0}

    async def worker(session: aiohttp.ClientSession) -> None:
        for path in paths:
            with open(path, "rb") as handle:
                image = base64.b64encode(handle.read()).decode()
            body = json.dumps({"appid": credentials.appid, "image": image})
            async with session.post(url + api.DETECT_PATH, data=body, headers=headers) as response:
                answer = json.loads(await response.read())
            counts["requests"] += 1
            counts["ok"] += answer.get("code") == 0

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return counts


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))))
