"""Nightly runs over a growing manifest, end to end: a real `python -m http.server` serves
some images and answers 404 for others, a real `batchtag serve --allow-private-urls`
fetches them. Dead links settle after --max-attempts runs; each night's exit status is the
one the table in errors.py documents; the requests each server saw are counted per night.
And the all-errors rerun, and errors that say what to do."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from batchtag import codes
from batchtag.records import iter_valid_records
from tests.support import (
    CREDENTIALS,
    Spawner,
    credentials_env,
    encode_image,
    free_port,
    http_get,
    requests_seen,
    run_cli,
    server_stats,
    wait_until,
    with_comment,
    write_credentials,
)

GOOD = [f"good{i}.jpg" for i in range(7)]
DEAD = [f"dead{i}.jpg" for i in range(3)]


@dataclass
class ImageSite:
    """`python -m http.server` over a folder; counts the GETs in its log."""

    url: str
    log: Path

    def gets(self) -> int:
        return len(re.findall(r'"GET /\S+ HTTP/1\.[01]"', self.log.read_text(errors="replace")))


def start_image_site(spawner: Spawner, folder: Path) -> ImageSite:
    folder.mkdir()
    for i, name in enumerate(GOOD):
        (folder / name).write_bytes(with_comment(encode_image(color=(30 * i, 90, 200 - 20 * i)), name))
    port = free_port()
    argv = [sys.executable, "-m", "http.server", port, "--bind", "127.0.0.1", "--directory", folder]
    proc = spawner.start_program(argv, name="http-server")
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return http_get(url + "/")[0] == 200
        except OSError:
            return False

    wait_until(answers, 30, "http.server to answer", alive=proc)
    return ImageSite(url, proc.stderr_path)


def night(tmp_path: Path, endpoint: str, names: list[str], site: ImageSite, n: int, *extra: str):
    """One night's run over the manifest so far; its result and --summary-json."""
    manifest = tmp_path / "urls.txt"
    manifest.write_text("".join(f"{site.url}/{name}\n" for name in names))
    summary = tmp_path / f"night{n}.json"
    result = run_cli(
        "run",
        manifest,
        "-o",
        tmp_path / "out.jsonl",
        "--endpoint",
        endpoint,
        "--no-progress",
        "--summary-json",
        summary,
        *extra,
        env=credentials_env(),
    )
    return result, json.loads(summary.read_text()) if summary.exists() else {}


def test_three_nights_with_dead_links_settle_and_exit_by_the_table(spawner, tmp_path):
    site = start_image_site(spawner, tmp_path / "site")
    _, endpoint = spawner.serve(write_credentials(tmp_path / "creds.json"), "--allow-private-urls")
    seen = {"serve": 0, "site": 0}

    def requests_since_last() -> tuple[int, int]:
        now = {"serve": requests_seen(server_stats(endpoint)), "site": site.gets()}
        delta = (now["serve"] - seen["serve"], now["site"] - seen["site"])
        seen.update(now)
        return delta

    # Night 1: 3 good, 3 dead. Each dead link: one quick retry. New errors: status 1.
    first, summary = night(tmp_path, endpoint, GOOD[:3] + DEAD, site, 1, "--max-attempts", "2")
    assert first.returncode == 1, first.stderr
    assert (summary["ok"], summary["new_errors"], summary["errors_again"]) == (3, 3, 0)
    assert requests_since_last() == (3 + 3 * 2, 3 + 3 * 2)
    assert sorted(f["code"] for f in summary["failures"]) == [codes.URL_DOWNLOAD_FAILED] * 3
    assert all(f["key"].endswith(tuple(DEAD)) for f in summary["failures"])
    records = {r.key: r for r in iter_valid_records(str(tmp_path / "out.jsonl"))}
    assert {r.extra["run_attempts"] for r in records.values() if not r.ok} == {1}
    assert len({r.extra["run"] for r in records.values()}) == 1
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r.extra["made"]) for r in records.values()
    )

    # Night 2: 2 more good; the dead links are tried again (run 2 of 2) and fail again:
    # nothing new failed, OUT holds errors: status 4 under the default --fail-on any.
    second, summary = night(tmp_path, endpoint, GOOD[:5] + DEAD, site, 2, "--max-attempts", "2")
    assert second.returncode == 4, second.stderr
    assert (summary["ok"], summary["new_errors"], summary["errors_again"], summary["open_errors"]) == (
        2,
        0,
        3,
        3,
    )
    assert requests_since_last() == (2 + 3 * 2, 2 + 3 * 2)

    # Night 3: 2 more good; the dead links have settled: not a request for them.
    third, summary = night(tmp_path, endpoint, GOOD[:7] + DEAD, site, 3, "--max-attempts", "2")
    assert third.returncode == 4, third.stderr
    assert (summary["ok"], summary["errors"], summary["settled_errors"]) == (2, 0, 3)
    assert requests_since_last() == (2, 2)
    assert "settled" in third.stderr
    records = {r.key: r for r in iter_valid_records(str(tmp_path / "out.jsonl"))}
    assert {r.extra["run_attempts"] for r in records.values() if not r.ok} == {2}
    assert len({r.extra["run"] for r in records.values()}) == 3  # each night's rows say which night

    # A pipeline that accepts its dead links: --fail-on new, nothing new: 0, no request.
    quiet, _ = night(tmp_path, endpoint, GOOD[:7] + DEAD, site, 4, "--max-attempts", "2", "--fail-on", "new")
    assert quiet.returncode == 0, quiet.stderr
    assert requests_since_last() == (0, 0)
    # --retry-errors tries them again (one quick retry each); failing again is not new:
    # 4 under --fail-on any, 0 under --fail-on new.
    retried, summary = night(tmp_path, endpoint, GOOD[:7] + DEAD, site, 5, "--retry-errors")
    assert retried.returncode == 4, retried.stderr
    assert (summary["new_errors"], summary["errors_again"], summary["open_errors"]) == (0, 3, 3)
    assert requests_since_last() == (3 * 2, 3 * 2)
    again, _ = night(tmp_path, endpoint, GOOD[:7] + DEAD, site, 6, "--retry-errors", "--fail-on", "new")
    assert again.returncode == 0, again.stderr
    assert requests_since_last() == (3 * 2, 3 * 2)
    print(f"\nnights: statuses 1, 4, 4 (then 0 with --fail-on new); requests per night {3 + 6}, {2 + 6}, 2")


def test_an_all_errors_out_is_not_success_and_the_refusal_says_what_to_do(spawner, tmp_path):
    """A server that refuses private urls (its default): every item fails, the record and
    the summary name --allow-private-urls; the rerun over the all-errors OUT exits 4, not 0;
    fixed server plus --retry-errors: 0."""
    site = start_image_site(spawner, tmp_path / "site")
    credentials = write_credentials(tmp_path / "creds.json")
    serve, endpoint = spawner.serve(credentials)
    first, summary = night(tmp_path, endpoint, GOOD[:5], site, 1)
    assert first.returncode == 1, first.stderr
    assert summary["errors"] == 5 and "--allow-private-urls" in first.stderr
    records = list(iter_valid_records(str(tmp_path / "out.jsonl")))
    assert all(r.code == codes.URL_FORMAT and "--allow-private-urls" in r.message for r in records)

    rerun, summary = night(tmp_path, endpoint, GOOD[:5], site, 2)
    assert rerun.returncode == 4, rerun.stderr  # nothing done, and OUT is all errors
    assert (summary["done"], summary["previous_errors"], summary["open_errors"]) == (0, 5, 5)
    assert "old errors" in rerun.stderr

    serve.stop()
    _, fixed = spawner.serve(credentials, "--allow-private-urls")
    repaired, summary = night(tmp_path, fixed, GOOD[:5], site, 3, "--retry-errors")
    assert repaired.returncode == 0, repaired.stderr
    assert (summary["ok"], summary["open_errors"]) == (5, 0)


@pytest.mark.parametrize(
    ("argv", "help_of"),
    [
        (["frobnicate"], "batchtag --help"),
        (["run"], "batchtag run --help"),
        (["export", "out.jsonl"], "batchtag export --help"),
        (["compact"], "batchtag compact --help"),
    ],
)
def test_usage_errors_point_to_the_right_help(argv, help_of):
    result = run_cli(*argv)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"(see {help_of})"), result.stderr


def test_a_missing_secret_key_names_the_key_file_and_environment_first(tmp_path):
    env = {"BATCHTAG_APPID": CREDENTIALS.appid, "BATCHTAG_SECRET_ID": CREDENTIALS.secret_id}
    env |= {"BATCHTAG_SECRET_KEY": "", "BATCHTAG_SECRET_KEY_FILE": ""}
    (tmp_path / "a.jpg").write_bytes(encode_image())
    result = run_cli(
        "run", tmp_path / "a.jpg", "-o", tmp_path / "o.jsonl", "--endpoint", "http://127.0.0.1:9", env=env
    )
    assert result.returncode == 2
    message = result.stderr
    assert "--secret-key-file" in message and "BATCHTAG_SECRET_KEY" in message
    assert "--secret-key " not in message and "--secret-key," not in message
    assert message.index("--secret-key-file") < message.index("BATCHTAG_SECRET_KEY")
