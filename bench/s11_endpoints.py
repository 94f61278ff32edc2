"""Section 9: several endpoints and the dry run.

A. Quotas add up: two ``batchtag serve --tagger color`` endpoints with ``--qps-limit`` Q and
   3Q, one ``batchtag run`` over both ([[endpoints]] with qps Q and 3Q): achieved ok/s
   against 4Q, and the code-15 answers both servers counted.
B. Failover: two equal endpoints (Q each); one is SIGKILLed once a third of the items are
   answered and restarted on its port a minute (RESTART_AFTER_S) later; the pool probes it
   1, 2, 4, then every 5 s. The items are enough that the run goes on ~20 s after the return.
   Every item ok; none answered ok twice, counted on the servers (their access logs, which
   survive the kill); seconds from the return until the servers' summed ok rate is back
   to >= 0.9 of 2Q over a 2 s window.
C. ``--dry-run`` on a 1,000,000-URL manifest with 900,000 done in OUT: wall time spawn to
   exit and peak RSS (bench.peak), against a 1-item dry run (interpreter and imports).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from batchtag.config import public_endpoint
from batchtag.records import Record, Settings
from bench.common import (
    ChildResult,
    Ctx,
    Row,
    Section,
    finish_client,
    image_set,
    run_client,
    serve,
    start_client,
    write_manifest,
)

Q = 25.0
RESTART_AFTER_S = 60.0
DETECT_OK = b"POST /v1/detection/imagetag_detect 200 code=0 "
DRY_ENDPOINT = "http://127.0.0.1:9"  # nothing listens: the dry run must not send anyway


def run(ctx: Ctx) -> Section:
    section = Section("endpoints", f"9. Several endpoints (Q = {Q:g}/s) and the dry run")
    images = image_set(ctx, "small-unique", ctx.pick(200, 20_000), (256, 192), unique=True)
    quotas_add_up(ctx, section, images)
    failover(ctx, section, images)
    dry_run_at_scale(ctx, section)
    return section


def endpoints_config(path: Path, urls_and_qps: list[tuple[str, float]]) -> Path:
    entries = [
        f'[[endpoints]]\nurl = "{url}"\nname = "ep{i}"\nqps = {qps:g}\n'
        for i, (url, qps) in enumerate(urls_and_qps)
    ]
    path.write_text("\n".join(entries))
    return path


def quotas_add_up(ctx: Ctx, section: Section, images: list[Path]) -> None:
    seconds = ctx.pick(2, 30)
    n = int(4 * Q * seconds)
    manifest = write_manifest(ctx.work / "s9-a.txt", images[:n])
    # Baseline in the same run: one endpoint whose quota is 4Q, one limiter at 4Q. What this
    # machine (client and servers sharing 2 cores) can do at that rate, without a pool.
    with serve(ctx, qps_limit=4 * Q) as single:
        base = run_client(
            ctx, [manifest], ctx.work / "s9-a0.jsonl", single.url, "--qps", str(4 * Q), "--concurrency", "16",
            timeout_s=n / Q + 120,
        )  # fmt: skip
    with serve(ctx, qps_limit=Q) as small, serve(ctx, qps_limit=3 * Q) as large:
        config = endpoints_config(ctx.work / "s9-a.toml", [(small.url, Q), (large.url, 3 * Q)])
        result = run_client(
            ctx, [manifest], ctx.work / "s9-a.jsonl", None, "--config", str(config), "--concurrency", "16",
            timeout_s=n / Q + 120,
        )  # fmt: skip
        answered = [small.answered(), large.answered()]
    rate, span, ok = steady_ok_rate(ctx.work / "s9-a.jsonl")
    base_rate, base_span, _ = steady_ok_rate(ctx.work / "s9-a0.jsonl")
    wall_rate, wall, _ = ok_rate(result.summary)
    base_wall_rate, base_wall, _ = ok_rate(base.summary)
    rejected = sum(a.get("15", 0) for a in answered)
    split = " / ".join(str(a.get("0", 0)) for a in answered)
    section.add(
        Row(
            f"A: quotas {Q:g} + {3 * Q:g}: achieved ok/s over 4Q ({n} items)",
            1,
            rate,
            "ok/s",
            rate / (4 * Q),
            ">= 0.95 of 4Q",
            rate / (4 * Q) >= 0.95,
            f"split Q:3Q endpoints {split}; {ok} ok of {n} over {span:.1f} s from the first record to the last; "
            f"over the client's wall {wall:.1f} s (start-up and drain included): {wall_rate / (4 * Q):.3f} of 4Q",
        )
    )
    section.add(
        Row(
            "A: the same over one endpoint with quota 4Q (baseline, same run)",
            1,
            base_rate,
            "ok/s",
            rate / base_rate if base_rate else None,
            "two endpoints / one (ratio; no goal)",
            None,
            f"one endpoint reaches {base_rate / (4 * Q):.3f} of 4Q here over {base_span:.1f} s; over the "
            f"client's wall {base_wall:.1f} s, {base_wall_rate / (4 * Q):.3f}",
        )
    )
    section.add(Row("A: code-15 answers (both servers)", 1, rejected, "answers", None, "0", rejected == 0))


def steady_ok_rate(out: Path) -> tuple[float, float, int]:
    """ok records per second between the first record's ``made`` stamp and the last (ms, UTC),
    the span, and the ok count: the rate the quotas allow once the run is going, without the
    client's start-up and the last answers' drain, which no quota governs."""
    stamps = sorted(
        datetime.fromisoformat(record["made"]).timestamp()
        for line in out.read_bytes().splitlines()
        if (record := json.loads(line)).get("code") == 0
    )
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return ((len(stamps) - 1) / span if span else 0.0), span, len(stamps)


def ok_rate(summary: dict[str, Any] | None) -> tuple[float, float, int]:
    """ok records per second of the client's wall time (start-up included), wall, ok."""
    summary = summary or {}
    wall = summary.get("wall_s") or 0.0
    ok = summary.get("ok", 0)
    return (ok / wall if wall else 0.0), wall, ok


def failover(ctx: Ctx, section: Section, images: list[Path]) -> None:
    # A third at 2Q, the minute at Q, then ~20 s at 2Q again: 4,000 items.
    seconds = ctx.pick(4, 80)
    n = int(2 * Q * seconds)
    manifest = write_manifest(ctx.work / "s9-b.txt", images[:n])
    out = ctx.work / "s9-b.jsonl"
    restart_after = ctx.pick(2.0, RESTART_AFTER_S)
    with serve(ctx, qps_limit=Q, extra_args=["-v"]) as a, serve(ctx, qps_limit=Q, extra_args=["-v"]) as b:
        config = endpoints_config(ctx.work / "s9-b.toml", [(a.url, Q), (b.url, Q)])
        started = time.monotonic()
        proc, summary_path, stderr = start_client(
            ctx, [manifest], out, None, "--config", str(config), "--concurrency", "16"
        )
        samples: list[tuple[float, int]] = []
        lives = [a, b]  # until the kill: a third of the items answered by both

        def ok_total() -> int:
            total = 0
            for server in lives:
                with contextlib.suppress(OSError):
                    total += server.answered().get("0", 0)
            return total

        wait_for(lambda: ok_total() >= n // 3, 120, proc)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=10)
        first_life = a.log.read_bytes().count(DETECT_OK)
        killed_at = time.monotonic()
        lives = [b]
        time.sleep(restart_after)  # the outage itself (a bench, not a test: the length is the point)
        port = int(a.url.rsplit(":", 1)[1])
        with serve(ctx, qps_limit=Q, extra_args=["-v"], port=port) as a2:
            back_at = time.monotonic()
            lives = [b, a2]

            def tick() -> None:
                samples.append((time.monotonic(), ok_total()))

            result = finish_client(
                proc, summary_path, stderr, started, timeout_s=n / Q + 180, on_tick=tick, tick_s=0.5
            )
            second_life = a2.log.read_bytes().count(DETECT_OK)
            b_oks = b.log.read_bytes().count(DETECT_OK)
    summary = result.summary or {}
    oks = first_life + b_oks + second_life
    recovered = recovery_seconds(samples, back_at, 0.9 * 2 * Q)
    section.add(
        Row(
            f"B: one of two endpoints killed, back after {restart_after:g} s: items ok ({n})",
            1,
            summary.get("ok", 0),
            "items",
            summary.get("ok", 0) / n,
            "1.0 (every item)",
            summary.get("ok", 0) == n and result.returncode == 0,
            f"exit {result.returncode}; records per endpoint {summary.get('endpoints', {})}",
        )
    )
    section.add(
        Row(
            "B: ok answers over both servers' lives (access logs) / items",
            1,
            oks,
            "answers",
            oks / n,
            "1.0 (none sent twice)",
            oks == n,
            f"killed endpoint {first_life} before the kill + {second_life} after its return, other {b_oks}",
        )
    )
    section.add(
        Row(
            "B: seconds from the return until >= 0.9 of 2Q (2 s window)",
            1,
            recovered if recovered is not None else "never",
            "s",
            None,
            "<= 10 s",
            recovered is not None and recovered <= 10.0,
            f"outage {back_at - killed_at:.1f} s; the pool probes 1, 2, 4, then every 5 s after it went out",
        )
    )


def recovery_seconds(samples: list[tuple[float, int]], back_at: float, goal: float) -> float | None:
    """The first 2 s window after ``back_at`` whose ok rate reaches ``goal``: its end."""
    after = [(t, ok) for t, ok in samples if t >= back_at]
    for i, (t0, ok0) in enumerate(after):
        for t1, ok1 in after[i + 1 :]:
            if t1 - t0 >= 2.0:
                if (ok1 - ok0) / (t1 - t0) >= goal:
                    return t1 - back_at
                break
    return None


def wait_for(condition: Any, timeout_s: float, proc: Any) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise RuntimeError(f"batchtag run ended early ({proc.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError("no progress")
        time.sleep(0.1)


def dry_run_files(ctx: Ctx, n: int, done: int) -> tuple[Path, Path]:
    """A manifest of ``n`` URLs and an OUT with an ok record for the first ``done`` (cached)."""
    manifest, out = ctx.work / f"dry-{n}.txt", ctx.work / f"dry-{n}-{done}.jsonl"
    marker = ctx.work / f"dry-{n}-{done}.made"
    if marker.exists() and out.exists() and manifest.exists():
        return manifest, out
    key = "https://img.example.invalid/{:07d}.jpg"
    settings = Settings(public_endpoint(DRY_ENDPOINT))
    tags = [{"tag_name": "红", "tag_confidence": 81}, {"tag_name": "明亮", "tag_confidence": 64}]
    line = Record(
        "@KEY@", "url", "ok", 0, "success", tags, 1, {"elapsed_ms": 12}, settings=settings
    ).to_line()
    head, tail = line.decode().split("@KEY@")
    write_manifest(manifest, (key.format(i) for i in range(n)))
    with open(out, "w", encoding="utf-8") as handle:
        for start in range(0, done, 10_000):
            handle.write(
                "".join(head + key.format(i) + tail for i in range(start, min(done, start + 10_000)))
            )
    marker.write_text("ok")
    return manifest, out


def dry_run_at_scale(ctx: Ctx, section: Section) -> None:
    n = ctx.pick(20_000, 1_000_000)
    done = n * 9 // 10
    manifest, out = dry_run_files(ctx, n, done)
    tiny, tiny_out = dry_run_files(ctx, 1, 0)
    size = out.stat().st_size
    base = dry_run_once(ctx, tiny, tiny_out)
    result = dry_run_once(ctx, manifest, out)
    summary = result.summary or {}
    assert out.stat().st_size == size, "the dry run wrote to OUT"
    section.add(
        Row(
            f"C: --dry-run, {n:,}-URL manifest, {done:,} done: wall time (spawn to exit)",
            1,
            result.wall_s,
            "s",
            result.wall_s / 5.0,
            "< 5 s",
            result.wall_s < 5.0,
            f"1-item dry run {base.wall_s:.2f} s; client CPU {result.cpu_s:.1f} s; counted "
            f"{summary.get('requests', '?'):,} requests, {summary.get('done', '?'):,} done; exit {result.returncode}",
        )
    )
    section.add(
        Row(
            "C: --dry-run peak RSS",
            1,
            result.maxrss_kb / 1024,
            "MB",
            result.maxrss_kb / 1024 / 150,
            "< 150 MB",
            result.maxrss_kb / 1024 < 150,
            f"1-item dry run {base.maxrss_kb / 1024:.1f} MB",
        )
    )


def dry_run_once(ctx: Ctx, manifest: Path, out: Path) -> ChildResult:
    return run_client(
        ctx, [manifest], out, DRY_ENDPOINT, "--dry-run", "--qps", str(4 * Q), fresh=False, timeout_s=300
    )
