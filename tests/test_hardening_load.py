"""Sustained load: `batchtag serve --tagger color` fed by two `batchtag run` clients at once
for a bounded time. No error but quota answers, every round complete with each key once,
and the server's resident memory (VmRSS, sampled) flat after warm-up.

The soak runs BATCHTAG_SOAK_SECONDS (default 600) sampling every 10 s; the short version
runs 15 s sampling every 2 s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import (
    Proc,
    encode_image,
    read_out,
    run_flags,
    vm_rss_kb,
    write_credentials,
)

SOAK_SECONDS = float(os.environ.get("BATCHTAG_SOAK_SECONDS", "600"))
LINKS_PER_CLIENT = 3000


@dataclass
class Client:
    name: str
    source: Path
    keys: list[str]
    rounds: int = 0
    records: int = 0
    codes: Counter = field(default_factory=Counter)
    proc: Proc | None = None
    out: Path | None = None
    peak_rss_kb: int = 0


def client_tree(root: Path, name: str, bases: list[Path], n: int) -> Client:
    """``n`` hard links, in a folder of the client's own, to a few image files: distinct keys."""
    folder = root / name
    folder.mkdir()
    keys = []
    for i in range(n):
        path = folder / f"{name}{i:06}.jpg"
        os.link(bases[i % len(bases)], path)
        keys.append(str(path))
    return Client(name, folder, sorted(keys))


def check_round(client: Client, complete: bool) -> None:
    result = read_out(client.out)  # every line a JSON record, none torn, no key twice
    if complete:
        assert sorted(result.keys) == client.keys
    else:
        assert set(result.keys) <= set(client.keys)
    client.codes.update(r["code"] for r in result.records)
    assert all(r["status"] == "ok" or r["code"] == 15 for r in result.records), client.codes
    client.records += len(result.records)


def sustained_load(tmp_path, spawner, seconds: float, sample_every: float) -> list[tuple[float, int]]:
    bases = []
    for i in range(4):
        base = tmp_path / f"base{i}.jpg"
        base.write_bytes(encode_image(size=(40 + i * 8, 30 + i * 6), color=(i * 60, 100, 250 - i * 50)))
        bases.append(base)
    clients = [client_tree(tmp_path, name, bases, LINKS_PER_CLIENT) for name in ("alpha", "beta")]
    server, url = spawner.serve(write_credentials(tmp_path / "creds.json"))

    def start_round(client: Client) -> None:
        client.out = tmp_path / f"{client.name}-{client.rounds}.jsonl"
        client.proc = spawner.start(
            "run",
            client.source,
            "-o",
            client.out,
            *run_flags(url),
            "--concurrency",
            "16",
            "--no-progress",
            name=f"run-{client.name}",
        )

    for client in clients:
        start_round(client)
    started = time.monotonic()
    deadline = started + seconds
    # At least ``seconds``, and on until each client has finished a whole round (a loaded
    # CI machine is slower: the load lasts longer rather than the test failing on speed).
    give_up = started + max(seconds * 8, 120)
    samples: list[tuple[float, int]] = []
    next_sample = started + sample_every
    while time.monotonic() < deadline or (
        not all(c.rounds >= 1 for c in clients) and time.monotonic() < give_up
    ):
        for client in clients:
            assert client.proc is not None
            if client.proc.poll() is None:
                with contextlib.suppress(OSError, AssertionError):  # it may just have exited
                    client.peak_rss_kb = max(client.peak_rss_kb, vm_rss_kb(client.proc.pid))
                continue
            assert client.proc.poll() == 0, client.proc.stderr()
            check_round(client, complete=True)
            client.out.unlink()
            client.rounds += 1
            start_round(client)
        now = time.monotonic()
        if now >= next_sample:
            assert server.poll() is None, server.stderr()
            samples.append((round(now - started, 1), vm_rss_kb(server.pid)))
            next_sample += sample_every
        time.sleep(0.05)

    samples.append((round(time.monotonic() - started, 1), vm_rss_kb(server.pid)))  # still under load
    for client in clients:  # stop the rounds in flight: they flush and exit 130
        assert client.proc is not None
        client.proc.signal(signal.SIGTERM)
        returncode = client.proc.wait(timeout=30)
        if returncode == -signal.SIGTERM:  # a round just starting: Python had no handler yet
            assert not read_out(client.out).records, "killed by SIGTERM after writing records"
        else:
            assert returncode in (0, 130), client.proc.stderr()
        check_round(client, complete=returncode == 0)
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0, server.stderr()

    seconds = time.monotonic() - started
    total = sum(c.records for c in clients)
    codes = sum((c.codes for c in clients), Counter())
    print(
        f"\nload {seconds:.0f} s: {total:,} records ({total / seconds:,.0f}/s), "
        f"rounds {[c.rounds for c in clients]}, codes {dict(codes)}, "
        f"client peak RSS {[round(c.peak_rss_kb / 1024) for c in clients]} MiB"
    )
    print("server VmRSS samples (s, MiB):", [(t, round(kb / 1024, 1)) for t, kb in samples])

    assert all(c.rounds >= 1 for c in clients)  # it really was under load: whole rounds done
    assert total >= 2 * LINKS_PER_CLIENT
    assert len(samples) >= 4
    warm = next(i for i, (t, _) in enumerate(samples) if t >= seconds * 0.2)
    baseline = samples[warm][1]
    assert samples[-1][1] < baseline * 1.5, f"server RSS grew from {baseline} kB to {samples[-1][1]} kB"
    return samples


def test_two_clients_for_15_seconds(tmp_path, spawner):
    sustained_load(tmp_path, spawner, seconds=15, sample_every=2)


@pytest.mark.soak
def test_two_clients_soak(tmp_path, spawner):
    sustained_load(tmp_path, spawner, seconds=SOAK_SECONDS, sample_every=10)
