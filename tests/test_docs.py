"""docs/api.md is executable: its curl example runs against a real `batchtag serve`, its
credentials example is what that server loads, and its code table is codes.py's."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batchtag import codes, errors
from batchtag.signing import verify
from tests.support import CREDENTIALS, run_cli

REPO = Path(__file__).resolve().parent.parent
API_DOC = REPO / "docs" / "api.md"


def doc_section(name: str) -> str:
    text = API_DOC.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"docs/api.md has no {name} section"
    return match.group(1)


def fenced(block: str, language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", block, re.S)
    assert match, f"no ```{language} block"
    return match.group(1)


def test_the_code_table_in_the_doc_is_the_one_in_codes_py():
    assert doc_section("codes") == codes.markdown_table(), "run: python -m batchtag.codes"


def test_the_exit_table_in_readme_and_run_help_is_the_one_in_errors_py():
    """README's exit-status table and `run --help` are both made from errors.exit_rows."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- exit-status:begin -->\n(.*?)<!-- exit-status:end -->", readme, re.S)
    assert match, "README.md has no exit-status section"
    assert match.group(1) == errors.exit_table_markdown(), "run: python -m batchtag.errors"
    shown = " ".join(run_cli("run", "--help").stdout.split())
    for status, when, fails in errors.exit_rows():
        assert f"{status} {' '.join(when.split())} [fails: {fails}]" in shown


def test_the_docs_curl_example_works_against_batchtag_serve(tmp_path, spawner):
    if shutil.which("curl") is None:  # make test installs it (Makefile TEST_TOOLS)
        pytest.skip("curl not installed")
    # The server loads the doc's own credentials example.
    example = re.search(r"```json\n(\{\"credentials\".*?)\n```", API_DOC.read_text(encoding="utf-8"), re.S)
    assert example, "docs/api.md has no credentials.json example"
    credentials = tmp_path / "credentials.json"
    credentials.write_text(example.group(1))
    _, url = spawner.serve(credentials)
    script = fenced(doc_section("curl-example"), "sh")
    assert "http://127.0.0.1:8080" in script
    script = script.replace("http://127.0.0.1:8080", url)  # the test's server, on a free port
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["code"] == codes.OK and answer["message"] == "success"
    assert answer["tags"] and all(0 <= tag["tag_confidence"] <= 100 for tag in answer["tags"])


def sign_env(**extra: str) -> dict[str, str]:
    return {
        "BATCHTAG_APPID": CREDENTIALS.appid,
        "BATCHTAG_SECRET_ID": CREDENTIALS.secret_id,
        "BATCHTAG_SECRET_KEY": CREDENTIALS.secret_key,
    } | extra


def lookup(secret_id: str):
    return CREDENTIALS if secret_id == CREDENTIALS.secret_id else None


def test_sign_prints_a_signature_that_verifies_and_never_the_key(tmp_path):
    done = run_cli("sign", "--bucket", "b1", "--ttl", "60", env=sign_env())
    assert done.returncode == 0, done.stderr
    authorization = done.stdout.strip()
    fields = verify(authorization, CREDENTIALS.appid, "b1", lookup)
    assert fields.expires - fields.now == 60 and fields.bucket == "b1"
    assert CREDENTIALS.secret_key not in done.stdout + done.stderr


def test_sign_reads_the_key_from_a_file(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(CREDENTIALS.secret_key + "\n")
    env = sign_env(BATCHTAG_SECRET_KEY="")
    done = run_cli("sign", "--secret-key-file", key_file, env=env)
    assert done.returncode == 0, done.stderr
    verify(done.stdout.strip(), CREDENTIALS.appid, None, lookup)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {"BATCHTAG_SECRET_KEY": ""}, "no secret key"),
        (["--secret-key", "x"], {}, "unrecognized arguments"),  # never in argv
        ([], {"BATCHTAG_SECRET_ID": ""}, "--secret-id"),
        (["--secret-key-file", "/no/such/file"], {}, "/no/such/file"),
    ],
)
def test_sign_without_what_it_needs_is_one_line_and_exit_2(args, env, message):
    done = run_cli("sign", *args, env=sign_env(**env))
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert message in line and "Traceback" not in done.stderr and CREDENTIALS.secret_key not in line
    assert done.stdout == ""


def test_the_repo_points_to_its_own_docs_not_to_outside_files():
    outside = ("CONTRACT" + ".md", "API-NOTES" + ".md")  # split: this file must not match itself
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    offenders = []
    for name in tracked.split():
        path = REPO / name
        if path.suffix in (".py", ".md", ".toml", ".txt", ".cfg") and path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            offenders += [f"{name}: {word}" for word in outside if word in text]
    assert not offenders
