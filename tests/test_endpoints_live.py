"""Several endpoints end to end, against real `batchtag serve` servers with quotas and
faults: quotas add up, failover and return, wrong credentials on one endpoint among good
ones, SIGKILL of the client during a failover then a rerun, and the groups' settings.
The pool's arithmetic on virtual time: tests/test_endpoints.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path

from batchtag import codes, run_batch
from batchtag.server.app import STATE
from batchtag.signing import Credentials
from tests.support import (
    credentials_env,
    line_count,
    read_out,
    run_config,
    tiny_jpegs,
    wait_for_lines,
    wait_until,
    write_credentials,
)

DETECT_OK = "POST /v1/detection/imagetag_detect 200 code=0 "


def answered(server) -> Counter[int]:
    """API codes an in-process server answered, by code."""
    return Counter(server.app[STATE].answered)


def pool_config(creds, sources, out, *servers_and_qps, **overrides):
    """A RunConfig over several endpoints: (server, qps) pairs, each an [[endpoints]] entry."""
    endpoints = [
        {"url": server.url, "name": f"ep{i}", **({"qps": float(qps)} if qps else {})}
        for i, (server, qps) in enumerate(servers_and_qps)
    ]
    config = run_config(servers_and_qps[0][0], creds, sources, out, endpoints=endpoints, **overrides)
    return config


def oks_in_access_log(path: Path) -> int:
    """Requests a `batchtag serve -v` answered ok, from its access log (survives a SIGKILL)."""
    return path.read_text(errors="replace").count(DETECT_OK) if path.exists() else 0


async def test_quotas_add_up_with_no_code_15(serve, creds, tmp_path):
    """Quotas 4 and 12 a second: requests split about 1:3, no code 15 from either."""
    small, large = await serve(qps_limit=4), await serve(qps_limit=12)
    expected = tiny_jpegs(tmp_path / "in", 96, variety=96)
    out = tmp_path / "out.jsonl"
    config = pool_config(creds, [tmp_path / "in"], out, (small, 4), (large, 12), concurrency=8)
    summary = await asyncio.wait_for(run_batch(config.validate()), 120)
    records = read_out(out).records
    assert sorted(r["key"] for r in records) == expected
    assert all(r["status"] == "ok" for r in records)
    small_ok, large_ok = answered(small)[0], answered(large)[0]
    assert answered(small)[15] == answered(large)[15] == 0, "no request over either quota"
    assert small_ok + large_ok == 96, "each item sent once"
    assert 2.0 <= large_ok / small_ok <= 4.5, (small_ok, large_ok)
    by_endpoint = Counter(r["endpoint"] for r in records)
    assert by_endpoint == {"ep0": small_ok, "ep1": large_ok}
    assert summary.endpoints == {"ep0": small_ok, "ep1": large_ok}
    assert {r["settings"]["endpoint"] for r in records} == {config.settings().endpoint}


async def test_an_endpoint_answering_503_and_busy_codes_loses_its_items_to_the_other(serve, creds, tmp_path):
    """Every request to ``sick`` fails (503, code 203 or a dropped connection): the items it
    refused end ok on ``well``, and ``sick`` never answered one ok."""
    sick, well = await serve(inject_error_rate=1.0), await serve()
    expected = tiny_jpegs(tmp_path / "in", 60, variety=60)
    out = tmp_path / "out.jsonl"
    config = pool_config(creds, [tmp_path / "in"], out, (sick, 30), (well, 30), outage_wait=60.0)
    summary = await asyncio.wait_for(run_batch(config.validate()), 120)
    records = read_out(out).records
    assert sorted(r["key"] for r in records) == expected
    # A dropped connection may have been processed (the client cannot tell): it is retried
    # on the same endpoint, and after every retry dropped ((1/3)**4 of the items that went
    # there) ends as a transient error record a rerun does again. Never moved, never lost.
    moved_or_ok = [r for r in records if r["status"] == "ok"]
    ambiguous = [r for r in records if r["status"] != "ok"]
    assert all(r["endpoint"] == "ep1" for r in moved_or_ok)
    assert all(r["endpoint"] == "ep0" and r["code"] == codes.CLIENT_TRANSPORT_ERROR for r in ambiguous)
    assert len(moved_or_ok) >= 55
    assert answered(sick)[0] == 0 and answered(well)[0] == 60
    faults = sick.app[STATE].faults.counts
    assert faults["http_503"] + faults["code_203"] > 0
    assert summary.exit_code == (1 if ambiguous else 0)


async def test_a_timed_out_request_is_not_moved_to_another_endpoint(serve, creds, tmp_path):
    """``slow`` answers after 3 s, the client gives up after 1 s: a timed-out request may
    have been processed, so its item is retried on ``slow`` and ends there (a transient
    error record a rerun does again), never sent to ``fast`` as well."""
    slow, fast = await serve(inject_latency_ms=3000), await serve()
    tiny_jpegs(tmp_path / "in", 24, variety=24)
    out = tmp_path / "out.jsonl"
    config = pool_config(
        creds, [tmp_path / "in"], out, (slow, None), (fast, None), timeout=1.0, retries=1, concurrency=4
    )
    await asyncio.wait_for(run_batch(config.validate()), 120)
    records = read_out(out).records
    timed_out = [r for r in records if r["code"] == codes.CLIENT_TIMEOUT]
    assert timed_out, "some items went to the slow endpoint"
    assert all(r["endpoint"] == "ep0" and r["attempts"] == 2 for r in timed_out)
    assert answered(fast)[0] == sum(r["endpoint"] == "ep1" for r in records), "fast saw only its own items"


async def test_one_endpoint_with_wrong_credentials_among_good_ones(serve, creds, tmp_path, caplog):
    good, other = await serve(), await serve()
    expected = tiny_jpegs(tmp_path / "in", 40, variety=40)
    out = tmp_path / "out.jsonl"
    wrong_key = "wrong-secret-key-0123456789"
    config = pool_config(creds, [tmp_path / "in"], out, (good, 20), (other, 20))
    config.endpoints[1] = {**config.endpoints[1], "secret_key_env": "BT_TEST_WRONG_KEY"}
    os.environ["BT_TEST_WRONG_KEY"] = wrong_key
    try:
        summary = await asyncio.wait_for(run_batch(config.validate()), 120)
    finally:
        del os.environ["BT_TEST_WRONG_KEY"]
    records = read_out(out).records
    assert sorted(r["key"] for r in records) == expected
    assert all(r["status"] == "ok" and r["endpoint"] == "ep0" for r in records)
    assert summary.exit_code == 0
    lines = [r.getMessage() for r in caplog.records if "refused the credentials" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("ep1 refused the credentials")
    assert wrong_key not in caplog.text and creds.secret_key not in caplog.text
    refused = sum(answered(other).values())
    assert 1 <= refused <= config.concurrency, "only the requests in flight before its first answer"


async def test_adding_an_endpoint_of_the_same_service_is_not_a_settings_change(serve, creds, tmp_path):
    """A run on one [[endpoints]] entry, then on two: the second run resumes the first's OUT
    (no --retag needed) and sends only the new items; removing one again resumes too."""
    first, second = await serve(), await serve()
    tiny_jpegs(tmp_path / "in", 30, variety=30)
    out = tmp_path / "out.jsonl"
    one = pool_config(creds, [tmp_path / "in"], out, (first, None), service="color-service")
    await run_batch(one.validate())
    tiny_jpegs(tmp_path / "more", 20, variety=20)
    both = pool_config(
        creds,
        [tmp_path / "in", tmp_path / "more"],
        out,
        (first, None),
        (second, None),
        service="color-service",
    )
    summary = await run_batch(both.validate())
    assert summary.skipped_done == 30 and summary.done == 20
    only_second = pool_config(
        creds, [tmp_path / "in", tmp_path / "more"], out, (second, None), service="color-service"
    )
    summary = await run_batch(only_second.validate())
    assert summary.skipped_done == 50 and summary.done == 0
    assert {r["settings"]["endpoint"] for r in read_out(out).records} == {"color-service"}


def test_failover_and_return_with_server_side_counts(tmp_path, spawner):
    """Two `batchtag serve` endpoints; one is SIGKILLed mid-run and restarted on its port.
    Every item ends ok, each answered ok exactly once over both servers' lives (their access
    logs), and the restarted endpoint takes items again."""
    expected = tiny_jpegs(tmp_path / "in", 400, variety=400)
    credentials = write_credentials(tmp_path / "creds.json")
    a, url_a = spawner.serve(credentials, "-v", "--qps-limit", "40", name="serve-a")
    b, url_b = spawner.serve(credentials, "-v", "--qps-limit", "40", name="serve-b")
    port_a = int(url_a.rsplit(":", 1)[1])
    out = tmp_path / "out.jsonl"
    client = spawner.start(
        "run", tmp_path / "in", "-o", out, "--endpoint", url_a, "--endpoint", url_b, "--qps", "20",
        "--concurrency", "8", "--timeout", "5", "--no-progress",
        env=credentials_env(), name="run",
    )  # fmt: skip
    wait_for_lines(out, 80, client)
    a.signal(signal.SIGKILL)
    a.wait(timeout=10)
    at_kill = line_count(out)
    wait_for_lines(out, at_kill + 60, client)  # b alone carries the run meanwhile
    a2, _ = spawner.serve(credentials, "-v", "--qps-limit", "40", port=port_a, name="serve-a2")
    assert client.wait(timeout=120) == 0, client.stderr()
    records = read_out(out).records
    assert sorted(r["key"] for r in records) == expected
    assert all(r["status"] == "ok" for r in records)
    logs = [oks_in_access_log(p.stderr_path) for p in (a, b, a2)]
    assert sum(logs) == 400, f"each item answered ok exactly once over all lives: {logs}"
    assert logs[2] > 0, "the restarted endpoint was taken back"
    name_a = url_a.replace("localhost", "127.0.0.1")
    assert Counter(r["endpoint"] for r in records)[name_a] == logs[0] + logs[2]
    assert "is not answering" in client.stderr() and "back in" in client.stderr()


def test_sigkill_during_failover_then_rerun_one_valid_record_per_key(tmp_path, spawner):
    expected = tiny_jpegs(tmp_path / "in", 300, variety=300)
    credentials = write_credentials(tmp_path / "creds.json")
    a, url_a = spawner.serve(credentials, "--inject-latency-ms", "5", name="serve-a")
    _, url_b = spawner.serve(credentials, "--inject-latency-ms", "5", name="serve-b")
    out = tmp_path / "out.jsonl"
    flags = ["--endpoint", url_a, "--endpoint", url_b, "--qps", "30", "--concurrency", "8", "--no-progress"]
    client = spawner.start("run", tmp_path / "in", "-o", out, *flags, env=credentials_env(), name="run")
    wait_for_lines(out, 50, client)
    a.signal(signal.SIGKILL)
    a.wait(timeout=10)
    wait_until(lambda: "is not answering" in client.stderr(), 60, "the client noticed", alive=client.popen)
    client.signal(signal.SIGKILL)
    client.wait(timeout=10)
    assert line_count(out) < 300
    rerun = spawner.start("run", tmp_path / "in", "-o", out, *flags, env=credentials_env(), name="rerun")
    assert rerun.wait(timeout=120) == 0, rerun.stderr()
    records = read_out(out).records  # no key twice, no torn line
    assert sorted(r["key"] for r in records) == expected
    assert all(r["status"] == "ok" for r in records)


def test_credentials_are_never_in_messages(tmp_path):
    """An [[endpoints]] entry without credentials: one line naming the entry and the settings."""
    from batchtag.config import build_config
    from batchtag.errors import ConfigError

    config = tmp_path / "c.toml"
    config.write_text(
        '[[endpoints]]\nurl = "https://a.example"\nname = "a"\n[[endpoints]]\nurl = "https://b.example"\n'
    )
    try:
        build_config({"sources": ["x"], "out": "o.jsonl"}, str(config), environ={})
    except ConfigError as exc:
        assert "a has no appid, secret-id, secret-key" in str(exc)
    else:
        raise AssertionError("accepted endpoints without credentials")
    creds = Credentials("1", "sid", "s3cret")
    assert creds.secret_key not in repr(run_config(type("S", (), {"url": "http://x"}), creds, [], "o"))
