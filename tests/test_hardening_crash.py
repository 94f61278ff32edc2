"""Crash safety: `batchtag run` SIGKILLed at random moments, rerun each time, loses nothing.

A real `batchtag serve --tagger color --inject-latency-ms 5` subprocess answers; the client
is a real `python -m batchtag run` subprocess. Kills alternate between a random delay after
the start (often during start-up: config, lock, torn-tail repair, checkpoint scan) and a
random number of new records (mid-stream, possibly mid-write). After every kill OUT must
hold only valid, distinct records (a torn last line is allowed: the next run cuts it off);
after the final rerun, every key exactly once, all ok.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass

import pytest

from tests.support import (
    line_count,
    read_out,
    run_cli,
    run_flags,
    tiny_jpegs,
    write_credentials,
)

SEED = int(os.environ.get("BATCHTAG_SOAK_SEED", "20240505"))


@dataclass
class Kill:
    mode: str  # "delay" or "records"
    lines_before: int
    lines_after: int
    torn: bool


def crash_loop(tmp_path, spawner, n_items, kills_wanted, max_records_per_run, max_delay_s, budget_s):
    expected = tiny_jpegs(tmp_path / "in", n_items)
    _, url = spawner.serve(write_credentials(tmp_path / "creds.json"), "--inject-latency-ms", "5")
    out = tmp_path / "out.jsonl"
    args = ["run", tmp_path / "in", "-o", out, *run_flags(url), "--concurrency", "16", "--no-progress"]
    rng = random.Random(SEED)
    kills: list[Kill] = []
    deadline = time.monotonic() + budget_s
    for _ in range(kills_wanted * 3):  # bounded: a run that ends by itself is not a kill
        if len(kills) >= kills_wanted:
            break
        assert time.monotonic() < deadline, f"crash loop over its time budget (seed {SEED})"
        before = line_count(out)
        assert before < n_items, f"all items done after {len(kills)} kills (seed {SEED})"
        mode = "records" if len(kills) % 2 else "delay"
        delay = rng.uniform(0.0, max_delay_s) if mode == "delay" else 30.0
        target = before + rng.randint(1, max_records_per_run)
        proc = spawner.start(*args, name="run")
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < delay and line_count(out) < target:
            time.sleep(0.003)
        if proc.poll() is not None:
            assert proc.poll() == 0, proc.stderr()
            continue
        proc.signal(signal.SIGKILL)
        if proc.wait(timeout=15) == 0:
            continue  # it finished in the instant before the signal: not a kill
        assert proc.poll() == -signal.SIGKILL, proc.stderr()
        state = read_out(out, allow_torn=True)  # valid complete lines, no key twice, after every kill
        assert all(r["status"] == "ok" for r in state.records)
        kills.append(Kill(mode, before, len(state.records), bool(state.torn)))
    assert len(kills) >= kills_wanted, f"only {len(kills)} kills landed (seed {SEED})"
    mid_stream = [k for k in kills if k.lines_after > k.lines_before]
    assert len(mid_stream) >= kills_wanted // 2, kills  # not all of them during start-up

    final = run_cli(*args, timeout=120)
    assert final.returncode == 0, final.stderr
    assert "Traceback" not in final.stderr
    result = read_out(out)  # no torn line left, every line a JSON record, no key twice
    assert sorted(result.keys) == expected  # every key exactly once
    assert all(r["status"] == "ok" and r["code"] == 0 and r["attempts"] >= 1 for r in result.records)
    print(
        f"\ncrash loop (seed {SEED}): {len(kills)} SIGKILLs, "
        f"{sum(k.torn for k in kills)} left a torn line, {len(mid_stream)} mid-stream; "
        f"records at each kill: {[k.lines_after for k in kills]}"
    )
    return kills


def test_sigkill_at_random_moments_short(tmp_path, spawner):
    """300 items, 3 random SIGKILLs and reruns; the short version of the soak below."""
    crash_loop(
        tmp_path,
        spawner,
        n_items=300,
        kills_wanted=3,
        max_records_per_run=60,
        max_delay_s=0.8,
        budget_s=20,
    )


@pytest.mark.soak
def test_sigkill_at_random_moments_soak(tmp_path, spawner):
    """2,000 items, 20 random SIGKILLs and reruns: every key exactly once at the end."""
    crash_loop(
        tmp_path,
        spawner,
        n_items=2000,
        kills_wanted=20,
        max_records_per_run=60,
        max_delay_s=1.0,
        budget_s=300,
    )
