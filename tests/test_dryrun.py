"""``run --dry-run`` and ``--max-requests`` end to end against a real server: the dry run
sends and writes nothing, and its request count is what the real run then sends, counted
on the server; a run capped by --max-requests stops cleanly with its own exit status and
a rerun finishes the work."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

from batchtag.errors import EXIT_STATUS, Outcome
from batchtag.pipeline.client import RetryPolicy
from batchtag.server.app import STATE
from tests.support import credentials_env, free_port, read_out, run_cli, tiny_jpegs

MAX_REQUESTS_EXIT = EXIT_STATUS[Outcome.REQUEST_LIMIT]


def requests_seen(server) -> int:
    state = server.app[STATE]
    return sum(state.answered.values())


async def cli(*args, **kwargs):
    """`batchtag ARGS` in a thread, so the in-process server keeps answering."""
    return await asyncio.to_thread(run_cli, *args, env=credentials_env(), **kwargs)


def make_photos(root) -> list[str]:
    """40 distinct photos, 6 byte-identical copies under other names, a thumbnail folder and
    a text file the walk leaves out, and one empty file (refused before any request)."""
    keys = tiny_jpegs(root, 40, variety=40)
    for i in range(6):
        shutil.copyfile(root / f"img{i:06}.jpg", root / f"copy{i}.jpg")
    (root / "@eaDir").mkdir()
    shutil.copyfile(root / "img000000.jpg", root / "@eaDir" / "thumb.jpg")
    (root / "zempty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not a photo")
    return keys


def snapshot(path) -> tuple[bytes, int]:
    return path.read_bytes(), os.stat(path).st_mtime_ns


async def test_dry_run_counts_what_the_run_then_sends(serve, tmp_path):
    server = await serve()
    photos = tmp_path / "in"
    make_photos(photos)
    out = tmp_path / "out.jsonl"
    flags = ["--endpoint", server.url, "--no-progress", "--concurrency", "4"]

    first = await cli("run", photos, "-o", out, *flags, "--max-requests", "12")
    assert first.returncode == MAX_REQUESTS_EXIT, first.stderr
    assert "stopped at --max-requests" in first.stderr
    assert requests_seen(server) == 12, "exactly N requests"
    done_before = len(read_out(out).records)
    # One finished photo changes: done again.
    changed = next(r["key"] for r in read_out(out).records if r["key"].endswith(".jpg") and "img" in r["key"])
    os.utime(changed, ns=(1, 1))

    before = snapshot(out)
    summary_path = tmp_path / "dry.json"
    dry = await cli(
        "run", photos, "-o", out, *flags, "--qps", "5", "--dry-run", "--summary-json", summary_path
    )
    assert dry.returncode == 0, dry.stderr
    assert snapshot(out) == before, "OUT untouched: bytes and mtime"
    assert requests_seen(server) == 12, "the dry run sent nothing"
    assert not list(tmp_path.glob("out.jsonl.*")), "no lock or temp file"
    estimate = json.loads(summary_path.read_text())
    assert estimate["dry_run"] is True
    assert estimate["found"] == 40 + 6 + 1
    assert estimate["changed"] == 1
    assert estimate["refused"] == 1  # the empty file
    assert estimate["left_out_files"] == 1  # notes.txt
    assert sum(estimate["left_out"]["folders"].values()) == 1  # @eaDir
    assert estimate["done"] + estimate["changed"] == done_before
    assert estimate["new"] == estimate["found"] - done_before
    assert estimate["copies"] + estimate["reusable"] >= 1
    assert estimate["seconds_at_quota"] == estimate["requests"] / 5
    assert "requests" in dry.stderr and "nothing sent or written" in dry.stderr

    real = await cli("run", photos, "-o", out, *flags)
    assert real.returncode == 1, real.stderr  # the empty file's error record
    assert requests_seen(server) - 12 == estimate["requests"], "the dry run's count is what the run sent"


async def test_max_requests_stop_is_resumable(serve, tmp_path):
    server = await serve()
    keys = tiny_jpegs(tmp_path / "in", 30, variety=30)
    out = tmp_path / "out.jsonl"
    flags = ["--endpoint", server.url, "--no-progress", "--concurrency", "8"]
    capped = await cli("run", tmp_path / "in", "-o", out, *flags, "--max-requests", "10")
    assert capped.returncode == MAX_REQUESTS_EXIT, capped.stderr
    assert requests_seen(server) == 10
    assert len(read_out(out).records) == 10, "every answer written"
    rest = await cli("run", tmp_path / "in", "-o", out, *flags)
    assert rest.returncode == 0, rest.stderr
    assert sorted(read_out(out).keys) == keys
    assert requests_seen(server) == 30, "nothing sent twice"


def test_exit_status_of_max_requests_is_documented():
    help_text = run_cli("run", "--help").stdout
    assert f"{MAX_REQUESTS_EXIT}" in help_text and "--max-requests" in help_text
    assert Outcome.REQUEST_LIMIT.value.split(",")[0] in " ".join(help_text.split())


async def test_dry_run_of_a_url_manifest_counts_what_the_run_then_sends(serve, tmp_path):
    """A .txt manifest read a block at a time (CRLF, blanks, a comment, padding, repeats,
    odd characters, a bad URL) over an OUT with done, settling and torn records: at each
    step the dry run counts what the next run sends, --max-attempts included."""
    server = await serve(allow_private_urls=True)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: each URL fails and settles
    first = [f"{dead}/a{i}.jpg" for i in range(6)]
    later = [f"{dead}/ü 中/{{b}}{i}.jpg" for i in range(3)] + [f"{dead}/c{i}.jpg?x=1#f" for i in range(3)]
    manifest = tmp_path / "urls.txt"
    manifest.write_bytes("\r\n".join(first).encode())
    out = tmp_path / "out.jsonl"
    flags = ["--endpoint", server.url, "--no-progress", "--concurrency", "4", "--max-attempts", "2"]
    assert (await cli("run", manifest, "-o", out, *flags)).returncode == 1  # every URL an error
    tries = 1 + RetryPolicy().settle_retries  # a dead link's requests in one run (first attempts: 1)
    assert requests_seen(server) == 6 * tries
    entries = ["# a comment", "", *first[:3], f"  {later[0]}\t", *later, first[0], "ftp://x.example/a.jpg"]
    manifest.write_bytes("\r\n".join(entries + first[3:]).encode())
    line = out.read_bytes().split(b"\n")[0]
    torn = line.replace(json.loads(line)["key"].encode(), later[1].encode())[:-20]
    with open(out, "ab") as handle:  # a record of a URL still to do, torn by a crash
        handle.write(torn)
    summary = tmp_path / "dry.json"
    seen = requests_seen(server)
    for attempt in (2, 3):
        dry = await cli("run", manifest, "-o", out, *flags, "--dry-run", "--summary-json", summary)
        assert dry.returncode == 0, dry.stderr
        estimate = json.loads(summary.read_text())
        assert estimate["found"] == len(entries) + 3 - 2  # no blank, no comment
        # Repeats of URLs to do; the ftp URL is refused once, then done (its record)
        assert (estimate["duplicates"], estimate["refused"]) == ((2, 1) if attempt == 2 else (1, 0))
        real = await cli("run", manifest, "-o", out, *flags)
        assert real.returncode in (1, 4), real.stderr  # failures: new (1), then only old ones (4)
        sent, seen = requests_seen(server) - seen, requests_seen(server)
        assert sent == estimate["requests"] * tries, f"run {attempt}: the dry run counts what the run sent"
    assert requests_seen(server) == (6 + (6 + 6) + 6) * tries, "each URL tried in two runs, then left alone"
