"""Faults end to end: a flaky, jittery server; a server killed and restarted mid-run;
permanent errors that must never be retried."""

from __future__ import annotations

import asyncio
import io
import signal
import socket
import time

import pytest
from PIL import Image

from batchtag import codes, run_batch
from batchtag.server.app import STATE
from tests.support import (
    encode_image,
    free_port,
    line_count,
    read_out,
    run_config,
    run_flags,
    tiny_jpegs,
    write_credentials,
)


def config_for(server, creds, sources, out, **overrides):
    return run_config(server, creds, sources, out, **({"concurrency": 16, "retries": 10} | overrides))


def requests_received(server) -> int:
    """Detect requests the in-process server saw: answered, plus injected 503s and drops."""
    state = server.app[STATE]
    return sum(state.answered.values()) + state.faults.counts["http_503"] + state.faults.counts["drop"]


async def test_flaky_jittery_server_every_item_ends_ok_and_attempts_add_up(serve, creds, tmp_path):
    server = await serve(inject_error_rate=0.2, inject_latency_ms=5, inject_latency_jitter_ms=20)
    expected = tiny_jpegs(tmp_path / "in", 200)
    out = tmp_path / "out.jsonl"
    config = config_for(server, creds, [tmp_path / "in"], out, concurrency=32)
    summary = await asyncio.wait_for(run_batch(config), 120)
    result = read_out(out)  # every line JSON, no key twice
    assert sorted(result.keys) == expected
    assert all(r["status"] == "ok" and r["code"] == 0 for r in result.records)
    attempts = [r["attempts"] for r in result.records]
    assert min(attempts) >= 1 and sum(a > 1 for a in attempts) >= 10  # ~20% needed another go
    # Every request the server received is one recorded attempt, and the other way round.
    assert sum(attempts) == summary.attempts == requests_received(server)
    faults = server.app[STATE].faults.counts
    assert all(faults[kind] > 0 for kind in ("http_503", "code_203", "drop")), faults
    assert sum(faults.values()) == sum(attempts) - len(attempts)  # each failed attempt was a fault
    assert summary.ok == 200 and summary.exit_code == 0


def test_server_killed_and_restarted_mid_run_every_item_ends_ok(tmp_path, spawner):
    expected = tiny_jpegs(tmp_path / "in", 600)
    credentials = write_credentials(tmp_path / "creds.json")
    port = free_port()
    server, url = spawner.serve(credentials, "--inject-latency-ms", "5", port=port)
    out = tmp_path / "out.jsonl"
    client = spawner.start(
        "run",
        tmp_path / "in",
        "-o",
        out,
        *run_flags(url),
        "--concurrency",
        "16",
        "--retries",
        "10",
        "--timeout",
        "5",
        "--no-progress",
        name="run",
    )
    deadline = time.monotonic() + 30
    while line_count(out) < 100:
        assert client.poll() is None, client.stderr()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    server.signal(signal.SIGKILL)
    server.wait(timeout=10)
    at_kill = line_count(out)
    # The server is down: a bare socket on its port takes the client's connections and
    # drops them. Readiness signal: 32 attempts seen, so the client is retrying, not quitting.
    assert count_dropped_connections(port, 32, client) == 32
    assert client.poll() is None, "the client gave up while the server was down: " + client.stderr()
    assert line_count(out) - at_kill <= 16  # at most what was already answered and in the writer
    spawner.serve(credentials, "--inject-latency-ms", "5", port=port, name="serve-again")
    assert client.wait(timeout=90) == 0, client.stderr()
    result = read_out(out)
    assert at_kill < 600
    assert sorted(result.keys) == expected
    assert all(r["status"] == "ok" for r in result.records)
    assert max(r["attempts"] for r in result.records) > 1  # the outage cost some retries


def count_dropped_connections(port: int, wanted: int, client, timeout: float = 60.0) -> int:
    """Listen on ``port`` in place of the dead server, accept and drop ``wanted``
    connections (each a failed attempt for the client), and count them."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        listener.settimeout(0.2)
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < wanted:
            assert time.monotonic() < deadline, f"only {seen} attempts while the server was down"
            assert client.poll() is None, client.stderr()
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.close()
            seen += 1
    return seen


def png_bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (10000, 10000)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the in-process server's
async def test_permanent_errors_are_sent_once_and_never_retried(serve, creds, tmp_path):
    """(Refused credentials stop the whole run instead: test_run_stops.py.)"""
    server = await serve()
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(encode_image(size=(16, 12)))
    (folder / "bomb.png").write_bytes(png_bomb())  # 100 megapixels: over the server's pixel limit
    (folder / "truncated.jpg").write_bytes(encode_image(size=(16, 12))[:60])
    manifest = tmp_path / "urls.txt"
    manifest.write_text("http://127.0.0.1:9/private.jpg\n")  # loopback: refused by the server
    expect = {
        str(folder / "good.jpg"): codes.OK,
        str(folder / "bomb.png"): codes.IMAGE_TOO_LARGE,
        str(folder / "truncated.jpg"): codes.IMAGE_DECODE_FAILED,
        "http://127.0.0.1:9/private.jpg": codes.URL_FORMAT,
    }
    out = tmp_path / "out.jsonl"
    await asyncio.wait_for(run_batch(config_for(server, creds, [folder, manifest], out)), 60)
    records = read_out(out).by_key()
    assert {key: r["code"] for key, r in records.items()} == expect
    assert all(r["attempts"] == 1 for r in records.values())
    assert requests_received(server) == len(expect)  # one request each, no retry
