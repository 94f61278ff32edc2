"""The command line as users and schedulers meet it: real subprocesses, exit codes, signals."""

import errno
import json
import os
import signal

import pytest

from batchtag import codes
from batchtag.records import load_records
from tests.support import (
    CREDENTIALS,
    run_cli,
    run_flags,
    tiny_jpegs,
    wait_for_lines,
    wait_until,
    write_credentials,
)

SECRET_KEY = CREDENTIALS.secret_key


@pytest.fixture
def server_args(tmp_path, spawner):
    """A `batchtag serve --tagger color` subprocess with slowed answers; its run flags."""
    _, url = spawner.serve(write_credentials(tmp_path / "creds.json"), "--inject-latency-ms", "30")
    return run_flags(url)


def test_exit_0_when_every_item_is_ok(tmp_path, server_args):
    tiny_jpegs(tmp_path / "in", 5)
    result = run_cli("run", tmp_path / "in", "-o", tmp_path / "out.jsonl", *server_args)
    assert result.returncode == 0, result.stderr
    assert "5 items" in result.stderr and "ok" in result.stderr


def test_exit_1_when_some_items_failed(tmp_path, server_args):
    tiny_jpegs(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.jpg").write_text("not a picture")
    result = run_cli("run", tmp_path / "in", "-o", tmp_path / "out.jsonl", *server_args)
    assert result.returncode == 1
    assert "-1400" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "/no/such/dir", "-o", "OUT"], "No such file or directory"),
        (["run", "SRC", "-o", "OUT", "--concurrency", "0"], "--concurrency"),
        (["run", "SRC", "-o", "OUT", "--endpoint", "http://127.0.0.1:9"], "--appid"),
        (["run", "SRC", "-o", "OUT", "--config", "missing.toml"], "missing.toml"),
        (["run", "SRC"], "-o/--out"),
        (["run", "SRC", "-o", "OUT", "--bogus"], "unrecognized arguments"),
        (["run", "SRC", "-o", "/no/such/dir/out.jsonl", "--tagger", "color"], "cannot open"),
    ],
)
def test_usage_errors_exit_2_with_one_line_and_no_traceback(tmp_path, args, message):
    (tmp_path / "SRC").mkdir()
    result = run_cli(*[a if a not in ("SRC", "OUT") else tmp_path / a for a in args], cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_settings_layering_flags_over_env_over_config(tmp_path, server_args):
    endpoint = server_args[1]
    config = tmp_path / "run.toml"
    config.write_text(f'endpoint = "{endpoint}"\nappid = "1000001"\nsecret-id = "wrong"\nconcurrency = 2\n')
    tiny_jpegs(tmp_path / "in", 2)
    env = {"BATCHTAG_SECRET_ID": CREDENTIALS.secret_id, "BATCHTAG_SECRET_KEY": "wrong-too"}
    result = run_cli(
        "run",
        tmp_path / "in",
        "-o",
        tmp_path / "out.jsonl",
        "--config",
        config,
        "--secret-key",
        SECRET_KEY,
        env=env,
    )
    assert result.returncode == 0, result.stderr  # env beat the file, the flag beat env


def test_sigkill_mid_run_then_rerun_loses_nothing_and_repeats_nothing(tmp_path, server_args, spawner):
    expected = tiny_jpegs(tmp_path / "in", 150)
    out = tmp_path / "out.jsonl"
    for kill_after in (10, 60):
        proc = spawner.start("run", tmp_path / "in", "-o", out, "--concurrency", "8", *server_args)
        wait_for_lines(out, kill_after, proc)
        proc.signal(signal.SIGKILL)
        proc.wait(timeout=10)
    result = run_cli("run", tmp_path / "in", "-o", out, *server_args)
    assert result.returncode == 0, result.stderr
    keys = [r["key"] for r in load_records(out)]
    assert sorted(keys) == expected  # every key exactly once


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_flush_and_exit_130(tmp_path, server_args, spawner, signum):
    expected = tiny_jpegs(tmp_path / "in", 120)
    out = tmp_path / "out.jsonl"
    proc = spawner.start("run", tmp_path / "in", "-o", out, "--concurrency", "4", *server_args)
    wait_for_lines(out, 8, proc)
    proc.signal(signum)
    assert proc.wait(timeout=30) == 130, proc.stderr()
    stderr = proc.stderr()
    assert "Traceback" not in stderr
    partial = out.read_bytes()
    assert partial.endswith(b"\n")  # clean flush: no torn line
    done = [json.loads(line)["key"] for line in partial.splitlines()]
    assert 8 <= len(done) < 120 and len(set(done)) == len(done)
    result = run_cli("run", tmp_path / "in", "-o", out, *server_args)
    assert result.returncode == 0
    assert sorted(r["key"] for r in load_records(out)) == expected


def test_secrets_never_appear_in_output_records_summary_or_errors(tmp_path, server_args):
    tiny_jpegs(tmp_path / "in", 3)
    (tmp_path / "in" / "bad.jpg").write_text("x")
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    runs = [
        run_cli("run", tmp_path / "in", "-o", out, "--summary-json", summary, "-v", *server_args),
        # a wrong key: the run stops at the first answer, with one line that names the setting
        run_cli(
            "run",
            tmp_path / "in",
            "-o",
            tmp_path / "out2.jsonl",
            "-v",
            *server_args[:-1],
            SECRET_KEY + "-wrong",
        ),
        # a configuration error that names the secret flags
        run_cli(
            "run",
            tmp_path / "in",
            "-o",
            tmp_path / "out3.jsonl",
            "--endpoint",
            "http://127.0.0.1:9",
            "--secret-key",
            SECRET_KEY,
        ),
    ]
    texts = [r.stdout + r.stderr for r in runs] + [
        out.read_text(),
        summary.read_text(),
        (tmp_path / "out2.jsonl").read_text(),
    ]
    for text in texts:
        assert SECRET_KEY not in text
    assert runs[1].returncode == 2  # refused credentials stop the run: one line, no records
    assert f"code {codes.SIGNATURE_FAILED}" in runs[1].stderr
    assert codes.SIGNATURE_FAILED not in {r["code"] for r in load_records(tmp_path / "out2.jsonl")}


def test_embedded_local_server_with_zero_setup(tmp_path):
    tiny_jpegs(tmp_path / "in", 4)
    result = run_cli(
        "run",
        tmp_path / "in",
        "-o",
        tmp_path / "out.jsonl",
        "--tagger",
        "color",
        "--lang",
        "en",
        env={"BATCHTAG_ENDPOINT": ""},
    )
    assert result.returncode == 0, result.stderr
    records = load_records(tmp_path / "out.jsonl")
    assert len(records) == 4 and all(r["tags"] for r in records)
    assert all(t["tag_name"].isascii() for r in records for t in r["tags"])


def test_sigterm_during_start_up_is_exit_130_too(tmp_path, spawner):
    """Start-up is held open deterministically: the --config file is a FIFO, so the run
    blocks reading it; that the FIFO has a reader is the readiness signal (main() runs and
    its handler is installed). A signal before the interpreter reaches main() cannot be
    handled by any program, so it is not what this tests."""
    tiny_jpegs(tmp_path / "in", 3)
    fifo = tmp_path / "settings.toml"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    proc = spawner.start("run", tmp_path / "in", "-o", out, "--tagger", "color", "--config", fifo)
    writer = open_writer_once_read(fifo, proc)
    try:
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130, proc.stderr()
    finally:
        os.close(writer)
    assert "Traceback" not in proc.stderr() and "interrupted" in proc.stderr()
    assert not out.exists()  # nothing started, nothing written


def open_writer_once_read(fifo, proc, timeout=60.0):
    """Open ``fifo`` for writing as soon as ``proc`` opened it for reading: until then the
    open fails with ENXIO. Returns the file descriptor (the reader now waits for data)."""
    descriptor = None

    def opened():
        nonlocal descriptor
        try:
            descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            return False
        return True

    wait_until(opened, timeout, "the run to open its --config FIFO", alive=proc)
    return descriptor


def test_ctrl_c_on_a_huge_manifest_stops_the_orderly_way(tmp_path, spawner):
    """1.5M lines with the progress bar on: nothing in the run (no second walk of the
    sources to count them, no resume scan, no walker chunk) may hold Ctrl-C up. The proof is
    the orderly summary: anything holding the stop up past ``interrupts.GRACE_S`` (1.5 s)
    ends in the watchdog's bare exit instead (no summary). No wall-clock bound: on a CI
    machine whose cores are busy elsewhere, a second of wall time is not a second of this
    process's time."""
    manifest = tmp_path / "huge.txt"
    with open(manifest, "w") as handle:
        handle.writelines(f"{tmp_path}/missing/{i:07}.jpg\n" for i in range(1_500_000))
    settings = tmp_path / "settings.toml"
    settings.write_text("progress = true\n")  # the bar (and, before, its counting walk) on
    out = tmp_path / "out.jsonl"
    proc = spawner.start("run", manifest, "-o", out, "--tagger", "color", "--config", settings)
    wait_for_lines(out, 1, proc)  # running: records are being written
    proc.signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, proc.stderr()
    assert "[interrupted]" in proc.stderr() and "Traceback" not in proc.stderr()
    written = out.read_bytes()
    assert written.endswith(b"\n") and 0 < written.count(b"\n") < 1_500_000


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    """``python -m batchtag.commands.show OUT | head -1``: the pipe closes after one line; show
    stops quietly (exit 1, nothing on stderr) instead of a BrokenPipeError traceback."""
    import subprocess

    from batchtag.records import Record
    from tests.support import batchtag_command

    out = tmp_path / "out.jsonl"
    lines = (
        Record(
            f"https://example.com/{i:06}.jpg",
            "url",
            "ok",
            0,
            "success",
            [{"tag_name": "猫", "tag_confidence": 90}],
            1,
        )
        for i in range(20_000)  # ~800 KB of output: far more than a pipe buffer holds
    )
    out.write_bytes(b"".join(record.to_line() for record in lines))
    proc = subprocess.Popen(
        batchtag_command(out, module="batchtag.commands.show"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout.readline().startswith(b"https://example.com/000000.jpg")
    proc.stdout.close()
    assert proc.wait(timeout=60) == 1
    assert proc.stderr.read() == b""
