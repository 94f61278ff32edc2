"""Several endpoints and `--max-requests` under `--cluster`, end to end: a `dask scheduler`
and two `dask worker`s (tests/test_cluster.py's `start_dask`), real `batchtag serve`
endpoints with quotas, requests counted on the servers. The pool itself: test_endpoints*.py;
the local budget: test_run_stops.py."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from batchtag import codes
from batchtag.cluster.driver import Grants, run_on_cluster
from batchtag.cluster.worker import ChunkResult
from batchtag.config import RunConfig
from batchtag.pipeline.progress import Progress
from batchtag.pipeline.sink import open_sink
from batchtag.records import Record
from tests.support import (
    credentials_env,
    line_count,
    read_out,
    requests_seen,
    run_cli,
    server_stats,
    tiny_jpegs,
    wait_until,
    write_credentials,
)
from tests.test_cluster import start_dask

WORKERS = ["w1", "w2"]


def endpoints_toml(path: Path, *entries: dict[str, object]) -> Path:
    """A --config with one [[endpoints]] table an entry (strings and numbers only)."""
    tables = []
    for entry in entries:
        lines = [f"{key} = {json.dumps(value)}" for key, value in entry.items()]
        tables.append("[[endpoints]]\n" + "\n".join(lines))
    path.write_text("\n\n".join(tables) + "\n")
    return path


def cluster_run(photos: Path, out: Path, address: str, *flags: object, env: dict[str, str] | None = None):
    return run_cli(
        "run", photos, "-o", out, "--cluster", address, "--no-progress", "--concurrency", "4", *flags,
        env={**credentials_env(), **(env or {})}, timeout=300,
    )  # fmt: skip


def test_two_endpoints_with_their_own_quotas_over_two_workers(spawner, tmp_path):
    """Quotas 6 and 18 a second, each split over the two workers: every item ok once over
    both servers, both used, no code 15 from either, records and summary name them."""
    keys = tiny_jpegs(tmp_path / "photos", 240, variety=240)
    credentials = write_credentials(tmp_path / "creds.json")
    _, small = spawner.serve(credentials, "--qps-limit", 6, name="serve-small")
    _, large = spawner.serve(credentials, "--qps-limit", 18, name="serve-large")
    config = endpoints_toml(
        tmp_path / "two.toml",
        {"url": small, "name": "small", "qps": 6},
        {"url": large, "name": "large", "qps": 18},
    )
    address, _ = start_dask(spawner, tmp_path, WORKERS)
    out, summary_json = tmp_path / "out.jsonl", tmp_path / "summary.json"
    result = cluster_run(
        tmp_path / "photos", out, address, "--config", config, "--summary-json", summary_json
    )
    assert result.returncode == 0, result.stderr
    records = read_out(out).records  # no key twice
    assert sorted(r["key"] for r in records) == keys
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in records)
    answered = {name: server_stats(url)["responses"] for name, url in (("small", small), ("large", large))}
    assert all(counts.get(str(codes.RATE_LIMITED), 0) == 0 for counts in answered.values()), answered
    ok = {name: counts.get("0", 0) for name, counts in answered.items()}
    assert sum(ok.values()) == len(keys), f"each item answered once over both servers: {ok}"
    assert ok["small"] > 0 and ok["large"] > ok["small"], ok
    assert Counter(r["endpoint"] for r in records) == ok
    summary = json.loads(summary_json.read_text())
    assert summary["endpoints"] == ok
    assert sorted(summary["workers"]) == WORKERS


def test_one_endpoint_refusing_the_credentials_among_good_ones(spawner, tmp_path):
    """The third endpoint gets a wrong secret key (read by the driver from the environment,
    as the others' key): the workers' pools drop it and the run finishes on the other two."""
    keys = tiny_jpegs(tmp_path / "photos", 160, variety=160)
    credentials = write_credentials(tmp_path / "creds.json")
    urls = [spawner.serve(credentials, name=f"serve-{i}")[1] for i in range(3)]
    wrong_key = "wrong-secret-key-0123456789"
    config = endpoints_toml(
        tmp_path / "three.toml",
        {"url": urls[0], "name": "a", "qps": 15},
        {"url": urls[1], "name": "b", "qps": 15},
        {"url": urls[2], "name": "refusing", "qps": 15, "secret-key-env": "BT_TEST_WRONG_KEY"},
    )
    address, _ = start_dask(spawner, tmp_path, WORKERS)
    out = tmp_path / "out.jsonl"
    result = cluster_run(
        tmp_path / "photos", out, address, "--config", config, env={"BT_TEST_WRONG_KEY": wrong_key}
    )
    assert result.returncode == 0, result.stderr
    records = read_out(out).records
    assert sorted(r["key"] for r in records) == keys
    assert all(r["status"] == "ok" for r in records)
    assert {r["endpoint"] for r in records} == {"a", "b"}
    refused = server_stats(urls[2])["responses"]
    assert refused.get("0", 0) == 0 and sum(refused.values()) > 0, refused
    assert sum(server_stats(url)["responses"].get("0", 0) for url in urls[:2]) == len(keys)
    assert wrong_key not in result.stderr and credentials_env()["BATCHTAG_SECRET_KEY"] not in result.stderr
    said = [line for line in result.stderr.splitlines() if "refused the credentials" in line]
    assert len(said) == 1 and ": refusing refused the credentials (" in said[0], result.stderr


@pytest.mark.parametrize("cluster", ["dask-cli", "local:2"])
def test_max_requests_over_the_cluster_then_a_rerun_finishes(spawner, tmp_path, cluster):
    """--max-requests 100 over two workers and two endpoints: the servers see at most 100
    requests, every answer is written, exit 5 with the summary saying so; the rerun sends
    each of the rest once. The `dask` CLI workers run one chunk at a time, the local:2 ones
    two at once on one shared client (each spends its own chunk's grant)."""
    limit = 100
    keys = tiny_jpegs(tmp_path / "photos", 300, variety=300)
    credentials = write_credentials(tmp_path / "creds.json")
    urls = [spawner.serve(credentials, name=f"serve-{i}")[1] for i in range(2)]
    endpoints = [flag for url in urls for flag in ("--endpoint", url)]
    address = start_dask(spawner, tmp_path, WORKERS)[0] if cluster == "dask-cli" else cluster
    out, summary_json = tmp_path / "out.jsonl", tmp_path / "summary.json"
    flags = [*endpoints, "--qps", 40]

    first = cluster_run(
        tmp_path / "photos", out, address, *flags, "--max-requests", limit, "--summary-json", summary_json
    )
    assert first.returncode == 5, first.stderr
    seen = sum(requests_seen(server_stats(url)) for url in urls)
    assert seen <= limit
    written = read_out(out).records
    assert len(written) == seen, "every answer written, nothing else"
    assert all(r["status"] == "ok" for r in written)
    summary = json.loads(summary_json.read_text())
    assert summary["limit_reached"] is True and summary["ok"] == len(written)
    assert "stopped at --max-requests" in first.stderr + first.stdout

    again = run_cli("run", tmp_path / "photos", "-o", out, *flags, env=credentials_env(), timeout=300)
    assert again.returncode == 0, again.stderr
    assert sorted(read_out(out).keys) == keys
    oks = sum(server_stats(url)["responses"].get("0", 0) for url in urls)
    assert oks == len(keys), "no item sent twice over both runs"


async def test_grants_never_hand_out_more_than_is_left():
    """Chunks take at most one request an item and never more than is left; a chunk waits
    while the rest is held by chunks that may give some back, and gets 0 once all is spent."""
    grants = Grants(100)
    assert await grants.take(64) == 64
    assert await grants.take(64) == 36
    waiting = asyncio.create_task(grants.take(64))
    await grants.give_back(64, 60)  # 4 unspent come back
    assert await waiting == 4
    await grants.give_back(36, 36)
    await grants.give_back(4, 4)
    assert await grants.take(64) == 0
    assert await Grants(None).take(64) is None


def answer_with_a_retry_each(run_id: str, items: list, grant: int | None = None) -> ChunkResult:
    """A worker task whose every item takes two requests (a try and a retry): a grant of G
    answers G // 2 items; an odd one is a first try cut short; the rest are not sent."""
    from distributed import get_worker

    assert grant is not None
    answered = items[: grant // 2]
    cut_short = grant % 2 if len(answered) < len(items) else 0
    tags = [{"tag_name": "x", "tag_confidence": 1}]
    records = [Record(i.key, i.kind, "ok", 0, "success", tags, 2) for i in answered]
    return ChunkResult(
        str(get_worker().name), records, 2 * len(answered) + cut_short, len(answered) < len(items)
    )


async def run_with_a_retry_each(tmp_path: Path, max_requests: int) -> tuple[Path, Any]:
    """tmp_path/photos over local:1, every item answered on its second request."""
    out = tmp_path / "out.jsonl"
    config = RunConfig(
        sources=[str(tmp_path / "photos")],
        out=str(out),
        cluster="local:1",
        tagger="color",
        max_requests=max_requests,
    )
    sink, checkpoint = open_sink(config.out)
    try:
        summary = await run_on_cluster(
            config, sink, checkpoint, Progress(False), task=answer_with_a_retry_each
        )
    finally:
        await sink.close()
    return out, summary


async def test_items_a_grant_did_not_reach_go_out_again_while_requests_are_left(tmp_path):
    """60 items at two requests each under --max-requests 150: each chunk's grant (one
    request an item) answers half of it; the other half goes out again with room for its
    retries, so all 60 end ok and the run is not cut short."""
    keys = tiny_jpegs(tmp_path / "photos", 60)
    out, summary = await run_with_a_retry_each(tmp_path, max_requests=150)
    assert sorted(read_out(out).keys) == keys
    assert summary.done == 60 and summary.attempts == 120 and not summary.limit_reached


async def test_a_cluster_run_stops_at_max_requests_when_retries_take_the_budget(tmp_path):
    """The same items under --max-requests 50: 25 end ok, the rest are passed over (no
    record) and the run says it stopped at the limit."""
    tiny_jpegs(tmp_path / "photos", 60)
    out, summary = await run_with_a_retry_each(tmp_path, max_requests=50)
    assert len(read_out(out).keys) == 25 and summary.attempts == 50
    assert summary.limit_reached and summary.exit_code == 5


async def test_each_endpoints_secret_key_reaches_the_workers_through_the_plugin(monkeypatch):
    """Several endpoints' credentials are read by the driver (a key from the environment
    here) and travel in the worker plugin as one endpoint's do; the workers rebuild the
    endpoints from it (README: More than one machine, Security)."""
    from distributed.protocol.pickle import loads

    from batchtag.cluster.driver import tagger_on_every_worker
    from tests.test_cluster import CapturingClient

    monkeypatch.setenv("BT_TEST_SECOND_KEY", "second-KEY-0123456789abcdef")
    config = RunConfig(
        sources=["a"], out="o.jsonl", appid="1250000000", secret_id="AKID-ours", secret_key="first-KEY-0123456789",
        endpoints=[{"url": "https://a.example", "name": "a"},
                   {"url": "https://b.example", "name": "b", "secret_key_env": "BT_TEST_SECOND_KEY"}],
        cluster="tcp://127.0.0.1:8786",
    ).validate().load_secret_key()  # fmt: skip
    client = CapturingClient()
    async with tagger_on_every_worker(client, config, "run1", 2):
        pass
    (shipped,) = client.shipped
    assert b"first-KEY-0123456789" in shipped and b"second-KEY-0123456789abcdef" in shipped
    specs = loads(shipped).config.endpoint_specs
    assert [(s.name, s.secret_key) for s in specs] == [
        ("a", "first-KEY-0123456789"),
        ("b", "second-KEY-0123456789abcdef"),
    ]
    assert "KEY-0123456789" not in repr(specs) + repr(config)


def test_a_worker_paces_each_endpoint_at_its_quota_divided_by_the_workers():
    """Quotas 12 and 30 over 2 workers: 6 and 15 a worker; 3 workers: 4 and 10; a code 15
    from one endpoint is announced under that endpoint's name."""
    from batchtag.cluster.worker import WorkerRuntime

    announced: list[str] = []
    runtime = WorkerRuntime(RunConfig(sources=["a"], out="o.jsonl"), 2, announced.append)
    try:
        small, large, free = (runtime.limiter_for(n, q) for n, q in (("s", 12.0), ("l", 30.0), ("f", None)))
        assert (small.max_rate, large.max_rate, free.max_rate) == (6.0, 15.0, None)
        runtime._set_workers(3)
        assert (small.max_rate, large.max_rate, free.max_rate) == (4.0, 10.0, None)
        large.on_rate_limited()
        assert announced == ["l"]
    finally:
        runtime.loop.close()


def test_max_requests_holds_when_a_worker_dies_mid_run(spawner, tmp_path):
    """A `dask worker` SIGKILLed once records arrive, under --max-requests 250: Dask reruns
    its chunks elsewhere (the one it was running, and finished ones whose results died with
    it) without a grant, as their first runs may have spent it, so the server still sees
    at most 250 requests; the run stops at the limit and a rerun finishes."""
    limit = 250
    keys = tiny_jpegs(tmp_path / "photos", 320, variety=320)
    _, url = spawner.serve(write_credentials(tmp_path / "creds.json"), "--inject-latency-ms", "20")
    address, workers = start_dask(spawner, tmp_path, WORKERS)
    out = tmp_path / "out.jsonl"
    flags = ["--endpoint", url, "--qps", 40, "--concurrency", 2, "--cluster", address, "--no-progress"]
    run = spawner.start(
        "run",
        tmp_path / "photos",
        "-o",
        out,
        *flags,
        "--max-requests",
        limit,
        env=credentials_env(),
        name="run",
    )
    wait_until(lambda: line_count(out) > 0, 120, "the first records", alive=run)
    workers["w1"].popen.send_signal(signal.SIGKILL)
    workers["w1"].wait(timeout=30)
    assert run.wait(timeout=180) == 5, run.stderr()
    seen = requests_seen(server_stats(url))
    assert seen <= limit
    assert 0 < len(read_out(out).records) <= seen
    again = run_cli("run", tmp_path / "photos", "-o", out, *flags, env=credentials_env(), timeout=300)
    assert again.returncode == 0, again.stderr
    assert sorted(read_out(out).keys) == keys


async def test_a_code_15_is_relayed_for_its_endpoint_once_a_cooldown():
    """The driver passes a worker's rate-limit event on to every worker for that endpoint
    only; a second event from the same endpoint within the cooldown is not relayed again."""
    from batchtag.cluster.driver import ClusterStage
    from batchtag.cluster.worker import relay_slowdown

    class RecordingDask:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        async def run(self, function, *args, wait=True):
            self.calls.append((function, *args))

    dask = RecordingDask()
    stage = ClusterStage(RunConfig(sources=["a"], out="o.jsonl"), dask, "run1", None, 2)
    for endpoint in ("small", "large", "small"):
        await stage.relay_slowdown((0.0, {"worker": "w1", "endpoint": endpoint}))
    assert dask.calls == [(relay_slowdown, "run1", "small"), (relay_slowdown, "run1", "large")]
