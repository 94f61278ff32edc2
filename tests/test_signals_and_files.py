"""Only regular files are read (real FIFOs, sockets, a symlink to /dev/zero), within a size
cap; Ctrl-C and SIGTERM end a run with 130 at any moment, however stuck its workers are."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from batchtag import codes
from tests.support import (
    LOCAL_RUN,
    NO_ENV_ENDPOINT,
    catches_sigterm,
    encode_image,
    line_count,
    read_out,
    run_cli,
    run_local,
    tiny_jpegs,
    wait_until,
)


def special_files(folder: Path) -> dict[str, Path]:
    """A FIFO, a listening Unix socket and a symlink to /dev/zero, all named like images."""
    fifo = folder / "pipe.jpg"
    os.mkfifo(fifo)
    zero = folder / "zero.jpg"
    zero.symlink_to("/dev/zero")
    sock_path = folder / "sock.jpg"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    listener.listen()
    special_files.keep = listener  # type: ignore[attr-defined]  # open for the test's length
    return {"fifo": fifo, "zero": zero, "socket": sock_path}


def test_fifos_sockets_and_devices_get_an_error_record_without_being_read(tmp_path):
    good = tiny_jpegs(tmp_path / "photos", 2)
    special = special_files(tmp_path / "photos")
    out = tmp_path / "out.jsonl"
    # walked from a folder, and given directly as SOURCEs
    result = run_local(tmp_path / "photos", special["fifo"], special["zero"], "-o", out, timeout=120)
    assert result.returncode == 1, result.stderr
    records = read_out(out).by_key()
    assert sorted(records) == sorted([*good, *map(str, special.values())])
    for kind, path in special.items():
        record = records[str(path)]
        assert record["code"] == codes.CLIENT_INPUT_ERROR and record["attempts"] == 0, record
        assert "not a regular file" in record["message"], (kind, record)
    assert "named pipe" in records[str(special["fifo"])]["message"]
    assert "device" in records[str(special["zero"])]["message"]
    assert all(records[key]["status"] == "ok" for key in good)


def test_a_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "small.jpg").write_bytes(encode_image(size=(8, 8)))
    (photos / "big.jpg").write_bytes(encode_image(size=(400, 300)) + bytes(50_000))
    config = tmp_path / "run.toml"
    config.write_text("max-file-bytes = 20000\n")
    out = tmp_path / "out.jsonl"
    result = run_local(photos, "-o", out, "--config", config)
    assert result.returncode == 1, result.stderr
    records = read_out(out).by_key()
    big = records[str(photos / "big.jpg")]
    assert big["code"] == codes.CLIENT_INPUT_ERROR and "file too large" in big["message"]
    assert "max-file-bytes" in big["message"] and big["attempts"] == 0
    assert records[str(photos / "small.jpg")]["status"] == "ok"


def start_run(spawner, *args: object, stdin: int | None = None):
    """`batchtag run ARGS` against the embedded server, in the background."""
    extra = {} if stdin is None else {"stdin": stdin}
    return spawner.start("run", *args, *LOCAL_RUN, name="run", env=NO_ENV_ENDPOINT, **extra)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_a_run_whose_threads_are_stuck_with_130_and_records_flushed(tmp_path, spawner, signum):
    """The manifest on stdin stays open, so the walker thread is stuck in a read forever
    (after the first chunk of lines: a key given twice is done once)."""
    paths = tiny_jpegs(tmp_path / "photos", 5)
    out = tmp_path / "out.jsonl"
    read_end, write_end = os.pipe()
    proc = start_run(spawner, "-", "-o", out, stdin=read_end)
    os.close(read_end)
    try:
        os.write(write_end, "".join(p + "\n" for p in paths * 500).encode())
        wait_until(lambda: line_count(out) == len(paths), 60, "the records", alive=proc)
        proc.signal(signum)
        assert proc.wait(timeout=30) == 130, proc.stderr()  # before: hung at exit
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr()
    assert sorted(read_out(out).keys) == paths  # every finished record, no torn line


def assert_interrupted_or_finished(proc, code: int, out: Path, paths: list[str]) -> None:
    """130 with no traceback, or 0 only for a run that had finished: its summary printed
    (not marked interrupted) and every item in OUT. Nothing else: not -2 or -15 (a signal
    Python's default handling met), not 1."""
    stderr = proc.stderr()
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert code in (130, 0), (code, stderr)
    if code == 0:
        assert f"batchtag: {len(paths)} items in" in stderr and "[interrupted]" not in stderr, stderr
        assert sorted(read_out(out).keys) == paths
    else:
        assert set(read_out(out).keys) <= set(paths)


def test_a_sigterm_at_any_moment_from_start_up_to_exit_is_exit_130(tmp_path, spawner):
    paths = tiny_jpegs(tmp_path / "photos", 40)
    out = tmp_path / "full.jsonl"
    started = time.monotonic()
    assert run_local(tmp_path / "photos", "-o", out).returncode == 0
    whole_run = time.monotonic() - started
    moments = [whole_run * k / 8 for k in range(8)]
    for number, delay in enumerate(moments):
        out = tmp_path / f"out-{number}.jsonl"
        proc = start_run(spawner, tmp_path / "photos", "-o", out)
        wait_until(lambda proc=proc: catches_sigterm(proc.pid), 60, "the handler", alive=proc)
        time.sleep(delay)  # a moment spread over the run's life, not a wait for readiness
        proc.signal(signal.SIGTERM)
        assert_interrupted_or_finished(proc, proc.wait(timeout=30), out, paths)
    # and right after the last record is written, as the run reports and exits
    out = tmp_path / "out-last.jsonl"
    proc = start_run(spawner, tmp_path / "photos", "-o", out)
    wait_until(lambda: line_count(out) == len(paths), 60, "the last record", alive=proc)
    proc.signal(signal.SIGTERM)
    assert_interrupted_or_finished(proc, proc.wait(timeout=30), out, paths)
    assert sorted(read_out(out).keys) == paths  # the run had written every record


def test_the_cli_help_documents_the_exit_statuses_and_the_size_cap():
    text = run_cli("run", "--help").stdout
    assert "3    the sources held no items" in text and "130" in text
