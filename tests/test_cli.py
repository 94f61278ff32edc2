"""The command line as users and schedulers meet it: real subprocesses, exit codes, signals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from batchtag import codes
from batchtag.sink import load_records

SECRET_KEY = "SUPERSECRET-key-7f3a9c"
SECRET_ID = "AKIDsecretIdValue12345"


def batchtag(*args, env=None, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "batchtag", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        **kwargs,
    )


def start(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "batchtag", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def make_photos(root, n):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (24, 16), (i % 256, 40, 90)).save(root / f"p{i:05}.jpg")
    return sorted(str(root / f"p{i:05}.jpg") for i in range(n))


@pytest.fixture
def server_args(tmp_path):
    """A `batchtag serve --tagger color` subprocess with slowed answers; its run flags."""
    creds = tmp_path / "creds.json"
    creds.write_text(
        json.dumps({"credentials": [{"appid": "1000001", "secret_id": SECRET_ID, "secret_key": SECRET_KEY}]})
    )
    port = free_port()
    server = start(
        "serve", "--tagger", "color", "--port", port, "--credentials", creds, "--inject-latency-ms", "30"
    )
    wait_healthy(port)
    yield [
        "--endpoint",
        f"http://127.0.0.1:{port}",
        "--appid",
        "1000001",
        "--secret-id",
        SECRET_ID,
        "--secret-key",
        SECRET_KEY,
    ]
    server.terminate()
    server.wait(timeout=10)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port, timeout=30.0):
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not become healthy")


def wait_for_lines(path, n, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    raise AssertionError("run made no progress")


def test_exit_0_when_every_item_is_ok(tmp_path, server_args):
    make_photos(tmp_path / "in", 5)
    result = batchtag("run", tmp_path / "in", "-o", tmp_path / "out.jsonl", *server_args)
    assert result.returncode == 0, result.stderr
    assert "5 items" in result.stderr and "ok" in result.stderr


def test_exit_1_when_some_items_failed(tmp_path, server_args):
    make_photos(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.jpg").write_text("not a picture")
    result = batchtag("run", tmp_path / "in", "-o", tmp_path / "out.jsonl", *server_args)
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
    result = batchtag(*[a if a not in ("SRC", "OUT") else tmp_path / a for a in args], cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_settings_layering_flags_over_env_over_config(tmp_path, server_args):
    endpoint = server_args[1]
    config = tmp_path / "run.toml"
    config.write_text(f'endpoint = "{endpoint}"\nappid = "1000001"\nsecret-id = "wrong"\nconcurrency = 2\n')
    make_photos(tmp_path / "in", 2)
    env = {"BATCHTAG_SECRET_ID": SECRET_ID, "BATCHTAG_SECRET_KEY": "wrong-too"}
    result = batchtag(
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


def test_sigkill_mid_run_then_rerun_loses_nothing_and_repeats_nothing(tmp_path, server_args):
    expected = make_photos(tmp_path / "in", 150)
    out = tmp_path / "out.jsonl"
    for kill_after in (10, 60):
        proc = start("run", tmp_path / "in", "-o", out, "--concurrency", "8", *server_args)
        wait_for_lines(out, kill_after, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    result = batchtag("run", tmp_path / "in", "-o", out, *server_args)
    assert result.returncode == 0, result.stderr
    keys = [r["key"] for r in load_records(out)]
    assert sorted(keys) == expected  # every key exactly once


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_flush_and_exit_130(tmp_path, server_args, signum):
    expected = make_photos(tmp_path / "in", 120)
    out = tmp_path / "out.jsonl"
    proc = start("run", tmp_path / "in", "-o", out, "--concurrency", "4", *server_args)
    wait_for_lines(out, 8, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    partial = out.read_bytes()
    assert partial.endswith(b"\n")  # clean flush: no torn line
    done = [json.loads(line)["key"] for line in partial.splitlines()]
    assert 8 <= len(done) < 120 and len(set(done)) == len(done)
    result = batchtag("run", tmp_path / "in", "-o", out, *server_args)
    assert result.returncode == 0
    assert sorted(r["key"] for r in load_records(out)) == expected


def test_secrets_never_appear_in_output_records_summary_or_errors(tmp_path, server_args):
    make_photos(tmp_path / "in", 3)
    (tmp_path / "in" / "bad.jpg").write_text("x")
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    runs = [
        batchtag("run", tmp_path / "in", "-o", out, "--summary-json", summary, "-v", *server_args),
        # a wrong key: every request refused, error records and messages everywhere
        batchtag(
            "run",
            tmp_path / "in",
            "-o",
            tmp_path / "out2.jsonl",
            "-v",
            *server_args[:-1],
            SECRET_KEY + "-wrong",
        ),
        # a configuration error that names the secret flags
        batchtag(
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
    assert runs[1].returncode == 1
    assert {r["code"] for r in load_records(tmp_path / "out2.jsonl")} >= {codes.SIGNATURE_FAILED}


def test_embedded_local_server_with_zero_setup(tmp_path):
    make_photos(tmp_path / "in", 4)
    result = batchtag(
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


def test_sigterm_during_start_up_is_exit_130_too(tmp_path):
    make_photos(tmp_path / "in", 3)
    proc = start("run", tmp_path / "in", "-o", tmp_path / "out.jsonl", "--tagger", "color")
    time.sleep(0.15)  # still importing or starting the embedded server
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode in (130, 0), stderr  # 0 only if the whole run beat the signal
    assert "Traceback" not in stderr
