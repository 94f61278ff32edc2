"""A full disk and an unwritable OUT: the run stops with one clear line (exit 2), keeps
every record it wrote intact, and a rerun on a working disk finishes with every key once."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from batchtag import run_batch
from batchtag.pipeline.sink import SinkError
from batchtag.server.app import STATE
from tests.support import FullDisk, read_out, run_cli, run_config, tiny_jpegs

REPO = Path(__file__).resolve().parent.parent

# `batchtag` with OUT on a disk that fills after argv[1] records: the CLI's run_batch is
# given a FullDisk writer (the sink's Writer seam; nothing else is replaced).
FULL_DISK_CLI = """
import functools, sys
from batchtag import cli
from batchtag.pipeline import batch as pipeline
from tests.support import FullDisk
disk = FullDisk(int(sys.argv[1]), int(sys.argv[2]))
pipeline.run_batch = functools.partial(pipeline.run_batch, writer=disk)
sys.exit(cli.main(sys.argv[3:]))
"""


def config_for(server, creds, sources, out, **overrides):
    return run_config(server, creds, sources, out, **({"retries": 5, "timeout": 30.0} | overrides))


@pytest.mark.parametrize("extra", [0, 40], ids=["at-a-record-boundary", "mid-record"])
async def test_disk_full_stops_the_run_keeps_what_was_written_then_a_rerun_completes(
    serve, creds, tmp_path, extra
):
    server = await serve(inject_latency_ms=2)
    expected = tiny_jpegs(tmp_path / "in", 200)
    out = tmp_path / "out.jsonl"
    disk = FullDisk(records=50, extra=extra)

    with pytest.raises(SinkError, match="No space left on device"):
        await asyncio.wait_for(run_batch(config_for(server, creds, [tmp_path / "in"], out), writer=disk), 60)
    assert disk.full and disk.refused >= 1
    written = read_out(out, allow_torn=True)  # valid JSON lines, no key twice
    assert len(written.records) == 50
    assert bool(written.torn) == bool(extra)  # a short write mid-record leaves a torn tail
    assert all(r["status"] == "ok" for r in written.records)
    assert set(written.keys) <= set(expected)
    assert sum(server.app[STATE].answered.values()) < 200  # it stopped, not tagged into the void

    # room on the disk again: the real writer
    summary = await asyncio.wait_for(run_batch(config_for(server, creds, [tmp_path / "in"], out)), 60)
    assert summary.skipped_done == 50 and summary.done == 150 and summary.exit_code == 0
    final = read_out(out)
    assert sorted(final.keys) == expected
    assert all(r["status"] == "ok" for r in final.records)


def test_disk_full_from_the_cli_is_exit_2_with_one_clear_line(tmp_path):
    expected = tiny_jpegs(tmp_path / "in", 120)
    out = tmp_path / "out.jsonl"
    args = ["run", tmp_path / "in", "-o", out, "--endpoint", "local", "--tagger", "color", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    full = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CLI, "30", "25", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert full.returncode == 2, full.stderr
    (line,) = full.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("batchtag: error:") and str(out) in line and "No space left on device" in line
    assert len(read_out(out, allow_torn=True).records) == 30

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(read_out(out).keys) == expected


def limit_memory_to_1_gib():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_out_on_dev_full_is_exit_2_with_one_line(tmp_path):
    tiny_jpegs(tmp_path / "in", 3)
    result = run_cli(
        "run",
        tmp_path / "in",
        "-o",
        "/dev/full",
        "--endpoint",
        "local",
        "--tagger",
        "color",
        "--no-progress",
        timeout=60,
        preexec_fn=limit_memory_to_1_gib,  # the bug eats memory until it runs out
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("batchtag: error:") and "/dev/full" in line


@pytest.mark.parametrize(
    ("make_out", "reason"),
    [
        (lambda tmp: "/dev/null/out.jsonl", "Not a directory"),
        (lambda tmp: str(tmp / "plain-file" / "out.jsonl"), "Not a directory"),
        (lambda tmp: str(tmp / "a-directory"), "Is a directory"),
    ],
    ids=["under-dev-null", "under-a-file", "a-directory"],
)
def test_unwritable_out_is_exit_2_with_one_line(tmp_path, make_out, reason):
    """As root, permissions do not bite: paths that no one can create stand in for them."""
    tiny_jpegs(tmp_path / "in", 3)
    (tmp_path / "plain-file").write_text("x")
    (tmp_path / "a-directory").mkdir()
    out = make_out(tmp_path)
    result = run_cli("run", tmp_path / "in", "-o", out, "--endpoint", "local", "--tagger", "color")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("batchtag: error:") and out in line and reason in line
