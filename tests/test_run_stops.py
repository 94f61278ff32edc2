"""Systemic failures stop the run instead of writing an error record per item: refused
credentials at once, an endpoint that never answered within a minute, one that went away
after a documented probing time. Real `batchtag serve` and `batchtag run` subprocesses."""

from __future__ import annotations

import signal
import time

import pytest

from batchtag import codes
from batchtag.signing import Credentials
from tests.support import (
    CREDENTIALS,
    assert_refused,
    free_port,
    line_count,
    read_out,
    requests_seen,
    run_cli,
    run_flags,
    server_stats,
    tiny_jpegs,
    wait_until,
    write_credentials,
)


@pytest.mark.parametrize(
    ("wrong", "code", "advice"),
    [
        (
            Credentials(CREDENTIALS.appid, CREDENTIALS.secret_id, "not-the-key"),
            codes.SIGNATURE_FAILED,
            "secret key",
        ),
        (
            Credentials(CREDENTIALS.appid, "AKIDnobody", CREDENTIALS.secret_key),
            codes.SECRET_ID_UNKNOWN,
            "--secret-id",
        ),
        (Credentials("4242", CREDENTIALS.secret_id, CREDENTIALS.secret_key), codes.APPID_UNKNOWN, "--appid"),
    ],
    ids=["wrong-secret-key", "unknown-secret-id", "unknown-appid"],
)
def test_refused_credentials_stop_the_run_at_once_with_one_line_and_no_records(
    tmp_path, spawner, wrong, code, advice
):
    _, url = spawner.serve(write_credentials(tmp_path / "creds.json"))
    tiny_jpegs(tmp_path / "photos", 60)
    out = tmp_path / "out.jsonl"
    result = run_cli("run", tmp_path / "photos", "-o", out, *run_flags(url, wrong), "--concurrency", "4")
    assert_refused(result, f"code {code}", advice)
    assert wrong.secret_key not in result.stderr
    assert line_count(out) == 0  # not one error record per item
    assert requests_seen(server_stats(url)) <= 4  # the senders in flight, nothing after


def test_an_endpoint_that_never_answered_stops_the_run_naming_it(tmp_path):
    tiny_jpegs(tmp_path / "photos", 30)
    out = tmp_path / "out.jsonl"
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connections refused
    result = run_cli("run", tmp_path / "photos", "-o", out, *run_flags(nobody + "/base/path?x=1"), timeout=90)
    assert_refused(result, nobody + " does not answer")
    assert "/base/path" not in result.stderr and "x=1" not in result.stderr
    assert line_count(out) == 0


@pytest.mark.parametrize("comes_back", [False, True], ids=["stays-away", "comes-back"])
def test_an_endpoint_that_goes_away_mid_run_is_probed_then_the_run_stops_or_goes_on(
    tmp_path, spawner, comes_back
):
    credentials = write_credentials(tmp_path / "creds.json")
    port = free_port()
    server, url = spawner.serve(credentials, "--inject-latency-ms", "50", port=port)
    keys = tiny_jpegs(tmp_path / "photos", 150)
    out = tmp_path / "out.jsonl"
    args = ["run", tmp_path / "photos", "-o", out, *run_flags(url), "--concurrency", "4", "--no-progress"]
    # Coming back: one retry (well under a second of backoff), so only probing can carry an
    # item over the 2 s gap (without it, each item in flight would end as a record of
    # code -9002, connection failed).
    extra = ["--outage-wait", "60", "--retries", "1"] if comes_back else ["--outage-wait", "3"]
    client = spawner.start(*args, *extra, name="client")
    wait_until(lambda: line_count(out) >= 10, 60, "the first records", alive=client)
    server.signal(signal.SIGKILL)
    server.wait(timeout=15)
    if comes_back:
        time.sleep(2.0)  # the length of the outage (the scenario, not a wait for readiness)
        spawner.serve(credentials, port=port)
        assert client.wait(timeout=120) == 0, client.stderr()
        final = read_out(out)
        assert sorted(final.keys) == keys and all(r["status"] == "ok" for r in final.records)
        return
    assert client.wait(timeout=90) == 2, client.stderr()
    message = client.stderr().strip().splitlines()
    assert len(message) == 1 and f"{url} stopped answering" in message[0], message
    written = read_out(out)
    assert 10 <= len(written.records) < len(keys)
    assert all(r["status"] == "ok" for r in written.records)  # no error record for the outage
    spawner.serve(credentials, port=port)
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(read_out(out).keys) == keys
