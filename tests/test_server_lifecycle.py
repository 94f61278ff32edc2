"""Starting, stopping and configuring the server: credentials files and ``serve_forever``."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from batchtag import codes
from batchtag.server import load_credentials_file, throwaway_credentials
from tests.support import encode_image, signed_headers

SECRET = "very-secret-key-value"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_credentials_from_json_and_toml(tmp_path: Path) -> None:
    json_file = write(
        tmp_path,
        "creds.json",
        json.dumps({"credentials": [{"appid": 1000001, "secret_id": "AKID1", "secret_key": SECRET}]}),
    )
    toml_file = write(
        tmp_path,
        "creds.toml",
        f'[[credentials]]\nappid = "1000001"\nsecret_id = "AKID1"\nsecret_key = "{SECRET}"\n'
        f'[[credentials]]\nappid = "1000002"\nsecret_id = "AKID2"\nsecret_key = "{SECRET}2"\n',
    )
    from_json, from_toml = load_credentials_file(json_file), load_credentials_file(toml_file)
    assert from_json == from_toml[:1]
    assert from_json[0].appid == "1000001" and from_toml[1].secret_key == SECRET + "2"


BAD_FILES = [
    ("bad.json", '{"credentials": [{"appid": "1", "secret_id": "AKID", "secret_key": "' + SECRET + '"'),
    ("bad.toml", f'[[credentials]]\nappid = "1"\nsecret_key = "{SECRET}\n'),
    ("empty.json", '{"credentials": []}'),
    ("list.json", "[]"),
    ("missing.json", json.dumps({"credentials": [{"appid": "1", "secret_key": SECRET}]})),
    ("wrong-type.json", json.dumps({"credentials": [{"appid": "1", "secret_id": 5, "secret_key": SECRET}]})),
    ("not-a-table.json", json.dumps({"credentials": [SECRET]})),
    (
        "duplicate.json",
        json.dumps({"credentials": [{"appid": "1", "secret_id": "K", "secret_key": SECRET}] * 2}),
    ),
]


@pytest.mark.parametrize(("name", "text"), BAD_FILES, ids=[name for name, _ in BAD_FILES])
def test_bad_credentials_files_fail_clearly_without_secrets(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError, match="credentials file") as raised:
        load_credentials_file(path)
    assert SECRET not in str(raised.value)
    assert str(path) in str(raised.value)


def test_missing_credentials_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_credentials_file(tmp_path / "nope.json")


async def test_throwaway_credentials_are_fresh_and_usable(serve, detect) -> None:
    first, second = throwaway_credentials(), throwaway_credentials()
    assert len({first.appid, second.appid} | {first.secret_id, second.secret_id}) == 4
    assert first.secret_key not in repr(first)
    server = await serve(credentials=[first])
    body = {"appid": first.appid, "image": base64.b64encode(encode_image()).decode()}
    _, answer = await detect(server, body, signed_headers(first))
    assert answer["code"] == codes.OK


SERVE_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="batchtag: %(levelname)s: %(message)s")  # as the CLI does
from batchtag.server import ServeConfig, serve_forever
from batchtag.signing import Credentials
serve_forever(ServeConfig(port=0, tagger="color", lang=sys.argv[1],
                          credentials=[Credentials("1000001", "AKID1", sys.argv[2])]))
print("returned", flush=True)
"""


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_forever_logs_its_url_and_stops_cleanly(stop_signal: signal.Signals) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, "en", SECRET],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        first_line = process.stderr.readline()
        match = re.search(r"serving on (http://127\.0\.0\.1:\d+) \(tagger=color, lang=en\)", first_line)
        assert match, first_line
        with urllib.request.urlopen(match.group(1) + "/healthz", timeout=5) as response:
            assert json.load(response) == {"status": "ok", "tagger": "color"}
        process.send_signal(stop_signal)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert stdout == "returned\n"
    assert SECRET not in first_line + stderr


def test_a_signal_after_serve_stopped_changes_nothing() -> None:
    """serve_forever has stopped cleanly; a late SIGTERM (a supervisor repeating itself) must
    not turn the clean exit into -15. The script waits on stdin after returning, so the
    second signal lands after the stop, by order, not by timing."""
    script = SERVE_SCRIPT + "sys.stdin.read()\nprint('exiting', flush=True)\n"
    process = subprocess.Popen(
        [sys.executable, "-c", script, "en", SECRET],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None and process.stdout is not None and process.stdin is not None
        assert "serving on" in process.stderr.readline()
        process.send_signal(signal.SIGTERM)
        assert process.stdout.readline() == "returned\n"
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(input="", timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert stdout == "exiting\n"
