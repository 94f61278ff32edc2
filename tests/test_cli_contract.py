"""The exit status describes this run; every error path is one line and exit 2; secrets
stay out of `ps` and out of messages. Real subprocesses, real files, a real server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchtag.records import iter_valid_records
from tests.support import (
    CREDENTIALS,
    assert_refused,
    encode_image,
    run_cli,
    run_local,
    tiny_jpegs,
    write_credentials,
)

APPID, SECRET_ID, SECRET_KEY = CREDENTIALS.appid, CREDENTIALS.secret_id, CREDENTIALS.secret_key


def test_a_rerun_with_nothing_new_exits_4_for_the_old_errors_or_0_with_fail_on_new(tmp_path):
    """The exit table (errors.exit_rows): new errors 1, old errors OUT still holds 4 under the
    default --fail-on any, 0 under --fail-on new; the summary names the failing key."""
    tiny_jpegs(tmp_path / "photos", 3)
    (tmp_path / "photos" / "broken.jpg").write_text("not an image")
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    first = run_local(tmp_path / "photos", "-o", out, "--summary-json", summary)
    assert first.returncode == 1, first.stderr
    failures = json.loads(summary.read_text())["failures"]
    assert [(f["key"], f["code"]) for f in failures] == [(str(tmp_path / "photos" / "broken.jpg"), -1400)]
    rerun = run_local(tmp_path / "photos", "-o", out, "--summary-json", summary)
    assert rerun.returncode == 4, rerun.stderr
    assert "old errors" in rerun.stderr and "--retry-errors" in rerun.stderr
    report = json.loads(summary.read_text())
    assert (report["previous_errors"], report["done"], report["exit_code"]) == (1, 0, 4)
    assert (report["new_errors"], report["open_errors"], report["failures"]) == (0, 1, [])
    assert run_local(tmp_path / "photos", "-o", out, "--fail-on", "new").returncode == 0
    assert run_local(tmp_path / "photos", "-o", out, "--fail-on", "none").returncode == 0


@pytest.mark.parametrize("kind", ["empty folder", "empty manifest"])
def test_zero_items_found_is_a_warning_and_exit_status_3(tmp_path, kind):
    source = tmp_path / "nas"
    if kind == "empty folder":
        (source / "not-mounted").mkdir(parents=True)
        (source / "readme.txt").write_text("not an image")
    else:
        source = tmp_path / "list.txt"
        source.write_text("# nothing yet\n\n")
    result = run_local(source, "-o", tmp_path / "out.jsonl", "--summary-json", "-")
    assert result.returncode == 3, result.stderr
    assert "no items found" in result.stderr and "Traceback" not in result.stderr
    assert json.loads(result.stdout)["exit_code"] == 3  # --summary-json - is standard output
    assert not (tmp_path / "out.jsonl").exists()  # no empty OUT left behind


def test_a_zero_item_rerun_keeps_an_existing_empty_out(tmp_path):
    """Only an OUT this run created is removed: one that was there stays, even empty."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"")
    assert run_local(tmp_path / "empty", "-o", out).returncode == 3
    assert out.exists() and out.read_bytes() == b""


def test_summary_json_dash_is_standard_output(tmp_path):
    tiny_jpegs(tmp_path / "photos", 2)
    result = run_local(tmp_path / "photos", "-o", tmp_path / "out.jsonl", "--summary-json", "-")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] == 2
    assert not (tmp_path / "-").exists()


@contextlib.contextmanager
def unwritable_folder(folder: Path) -> Iterator[None]:
    """No new file can be made in ``folder``, for root too (immutable flag) when possible."""
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if not chattr or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("root, and no immutable flag here: a folder cannot be made unwritable")
        try:
            yield
        finally:
            subprocess.run([chattr, "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def test_unwritable_out_folder_is_one_line_exit_2_and_out_intact(tmp_path):
    tiny_jpegs(tmp_path / "photos", 2)
    (tmp_path / "photos" / "broken.jpg").write_text("x")
    folder = tmp_path / "results"
    folder.mkdir()
    out = folder / "out.jsonl"
    assert run_local(tmp_path / "photos", "-o", out).returncode == 1
    before = out.read_bytes()
    with unwritable_folder(folder):
        # --retry-errors must rewrite OUT beside itself; a new OUT cannot be made at all
        assert_refused(run_local(tmp_path / "photos", "-o", out, "--retry-errors"), "cannot rewrite")
        assert_refused(run_local(tmp_path / "photos", "-o", folder / "new.jsonl"), "cannot open")
        assert out.read_bytes() == before and os.listdir(folder) == ["out.jsonl"]


@pytest.mark.parametrize("where", ["missing folder", "a directory", "a full disk"])
def test_unwritable_summary_path_is_one_line_exit_2(tmp_path, where):
    tiny_jpegs(tmp_path / "photos", 2)
    path = {
        "missing folder": tmp_path / "no" / "such" / "summary.json",
        "a directory": tmp_path,
        "a full disk": Path("/dev/full"),  # accepted at start, fails when written at the end
    }[where]
    result = run_local(tmp_path / "photos", "-o", tmp_path / "out.jsonl", "--summary-json", path)
    assert_refused(result, "--summary-json")


def test_credentials_inside_the_endpoint_are_refused_without_echoing_them(tmp_path):
    tiny_jpegs(tmp_path / "photos", 1)
    endpoint = "http://someone:hunter2-password@127.0.0.1:9/"
    result = run_cli(
        "run", tmp_path / "photos", "-o", tmp_path / "out.jsonl", "--endpoint", endpoint,
        "--appid", APPID, "--secret-id", SECRET_ID, "--secret-key", SECRET_KEY,
    )  # fmt: skip
    assert_refused(result, "user name or password")
    assert "hunter2" not in result.stderr and "someone" not in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_bad_config_values_name_the_setting_and_file_never_the_value(tmp_path):
    tiny_jpegs(tmp_path / "photos", 1)
    config = tmp_path / "run.toml"
    config.write_text('concurrency = "s3cret-looking-value"\n')
    result = run_local(tmp_path / "photos", "-o", tmp_path / "out.jsonl", "--config", config)
    assert_refused(result, "concurrency", str(config))
    assert "s3cret-looking-value" not in result.stderr


@pytest.fixture
def server_url(spawner, tmp_path) -> str:
    return spawner.serve(write_credentials(tmp_path / "creds.json"))[1]


def key_file(tmp_path: Path, mode: int, name: str = "secret-key") -> Path:
    path = tmp_path / name
    path.write_text(SECRET_KEY + "\n")
    path.chmod(mode)
    return path


def test_secret_key_from_a_private_file_or_its_env_var_never_on_the_command_line(
    tmp_path, spawner, server_url
):
    tiny_jpegs(tmp_path / "photos", 3)
    private = key_file(tmp_path, 0o600)
    flags = ["--endpoint", server_url, "--appid", APPID, "--secret-id", SECRET_ID, "--no-progress"]
    out = tmp_path / "out.jsonl"
    proc = spawner.start("run", tmp_path / "photos", "-o", out, *flags, "--secret-key-file", private)
    with open(f"/proc/{proc.pid}/cmdline", "rb") as handle:
        assert SECRET_KEY.encode() not in handle.read()  # what `ps` shows
    assert proc.wait(timeout=120) == 0, proc.stderr()
    assert all(r.ok for r in iter_valid_records(str(out)))  # the server accepted the signatures
    (tmp_path / "photos" / "more.jpg").write_bytes(encode_image())
    by_env = run_cli(
        "run", tmp_path / "photos", "-o", out, *flags, env={"BATCHTAG_SECRET_KEY_FILE": str(private)}
    )
    assert by_env.returncode == 0, by_env.stderr
    assert len(list(iter_valid_records(str(out)))) == 4


def test_a_secret_key_file_others_can_read_is_refused_by_name(tmp_path):
    tiny_jpegs(tmp_path / "photos", 1)
    shared = key_file(tmp_path, 0o644)
    result = run_cli(
        "run", tmp_path / "photos", "-o", tmp_path / "out.jsonl", "--endpoint", "https://127.0.0.1:9",
        "--appid", APPID, "--secret-id", SECRET_ID, "--secret-key-file", shared,
    )  # fmt: skip
    assert_refused(result, str(shared), "chmod 600")
    assert SECRET_KEY not in result.stderr


@pytest.mark.parametrize(
    ("endpoint", "warned"),
    [
        ("http://tagging.example.invalid", True),
        ("https://tagging.example.invalid", False),
        ("http://127.0.0.1:9", False),
        ("http://[::1]:9", False),
    ],
)
def test_plain_http_to_another_host_gets_a_warning(tmp_path, endpoint, warned):
    (tmp_path / "empty").mkdir()  # nothing to send: only the warning matters here
    result = run_cli(
        "run", tmp_path / "empty", "-o", tmp_path / "out.jsonl", "--endpoint", endpoint,
        "--appid", APPID, "--secret-id", SECRET_ID, "--secret-key", SECRET_KEY,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert ("plain http" in result.stderr) == warned


def test_the_provider_config_and_docs_use_https():
    root = Path(__file__).resolve().parent.parent
    config = (root / "configs" / "tencent.toml").read_text()
    assert 'endpoint = "https://service.image.myqcloud.com"' in config
    for doc in ("README.md", "configs/tencent.toml"):
        assert "http://service.image" not in (root / doc).read_text()
