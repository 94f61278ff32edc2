"""Section 3: rate accuracy against a server quota.

Phase A: ``batchtag run --qps Q`` against ``batchtag serve --qps-limit Q``: the achieved
rate should be Q (>= 0.97 Q) with no code-15 answer. Phase B: ``--qps 2Q`` against the same
limit: the adaptive limiter should settle near Q (>= 0.9 Q) with few rejections (< 3% of
requests). The server's /stats answer counters are polled every 0.5 s for the plot, and
give the server-side count of code-15 answers.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from bench.common import Ctx, Row, Section, finish_client, image_set, serve, start_client, write_manifest
from bench.plots import line_plot

Q = 50.0
TICK_S = 0.5


def run(ctx: Ctx) -> Section:
    seconds = ctx.pick(2, 30)
    section = Section("rate", f"3. Rate accuracy vs server quota (Q = {Q:g}/s, {seconds} s of work a phase)")
    images = image_set(ctx, "small-unique", ctx.pick(200, 20_000), (256, 192), unique=True)
    n = int(Q * seconds)
    phases = {}
    for label, qps in (("A", Q), ("B", 2 * Q)):
        manifest = write_manifest(ctx.work / f"s3-{label}.txt", images[:n])
        phases[label] = phase(ctx, manifest, qps, n)

    a, b = phases["A"], phases["B"]
    section.add(
        Row(
            f"A: --qps {Q:g} vs --qps-limit {Q:g}: achieved ok/s ({n} items)",
            1,
            a["rate"],
            "ok/s",
            a["rate"] / Q,
            ">= 0.97 of Q",
            a["rate"] / Q >= 0.97,
            f"client wall {a['wall']:.1f} s; server-side steady rate {a['server_rate']:.1f}/s",
        )
    )
    section.add(
        Row(
            "A: code-15 answers (server count)",
            1,
            a["rejected"],
            "answers",
            None,
            "0",
            a["rejected"] == 0,
            f"client: {a['attempts']} attempts for {a['done']} items; by_code {a['by_code']}",
        )
    )
    section.add(
        Row(
            f"B: --qps {2 * Q:g} vs --qps-limit {Q:g}: achieved ok/s ({n} items)",
            1,
            b["rate"],
            "ok/s",
            b["rate"] / Q,
            ">= 0.9 of Q",
            b["rate"] / Q >= 0.9,
            f"client wall {b['wall']:.1f} s; server-side steady rate {b['server_rate']:.1f}/s",
        )
    )
    share = b["rejected"] / max(1, b["answers"])
    section.add(
        Row(
            "B: share of requests rejected with code 15",
            1,
            share * 100,
            "%",
            share,
            "< 0.03",
            share < 0.03,
            f"{b['rejected']} of {b['answers']} answers; client {b['attempts']} attempts for "
            f"{b['done']} items; items failed: {b['failed']}",
        )
    )
    if a["rate"] / Q < 0.97:
        section.notes.append(
            f"Phase A reaches {a['rate'] / Q:.3f} of Q ({(0.97 - a['rate'] / Q) * 100:.1f} points under the goal). "
            "Look at ratelimit.AdaptiveRateLimiter.acquire: before commit e9bab34 it scheduled the next start "
            "from the wake-up time, so every asyncio oversleep was lost (0.947 of Q measured then); event-loop "
            "lag under CPU load (see the load average) and the first requests also count here."
        )
    if share >= 0.03:
        section.notes.append(
            f"Phase B rejects {share:.1%} of requests ({(share - 0.03) * 100:.1f} points over the goal): the AIMD "
            "limiter (ratelimit.py) cuts the rate by 0.8 on a code 15 then climbs back by 2% of its ceiling per "
            "second towards --qps 2Q, so it periodically overshoots the quota again and collects a burst of "
            "code 15 each time (see the plot); a ceiling that remembers the rate at which 15s started, or a "
            "slower climb once a limit was hit, would cut these."
        )
    section.notes.append(
        "Achieved = ok records / client wall time (summary wall_s, start-up excluded); the server-side "
        "steady rate is the slope of the server's code-0 counter between the first and last change."
    )
    xs_a = [t for t, *_ in a["series"]]
    xs_b = [t for t, *_ in b["series"]]
    longest = xs_a if len(xs_a) >= len(xs_b) else xs_b
    section.plots.append(
        line_plot(
            ctx.out / "rate-over-time.png",
            f"Answers per second at the server (quota {Q:g}/s), {TICK_S:g} s buckets",
            "seconds since client start",
            "answers / s",
            longest,
            {
                f"A ok (--qps {Q:g})": [ok for _, ok, _ in a["series"]],
                f"B ok (--qps {2 * Q:g})": [ok for _, ok, _ in b["series"]],
                "B code 15": [rej for _, _, rej in b["series"]],
                "A code 15": [rej for _, _, rej in a["series"]],
            },
            hlines={f"quota {Q:g}/s": Q},
        )
    )
    return section


def phase(ctx: Ctx, manifest: Any, qps: float, n: int) -> dict[str, Any]:
    with serve(ctx, latency_ms=0, qps_limit=Q) as server:
        samples: list[tuple[float, int, int]] = []
        started = time.monotonic()

        def tick() -> None:
            answered = server.answered()
            samples.append((time.monotonic() - started, answered.get("0", 0), answered.get("15", 0)))

        proc, summary_path, stderr = start_client(
            ctx, [manifest], ctx.work / "s3-out.jsonl", server.url, "--qps", str(qps), "--concurrency", "16"
        )
        result = finish_client(
            proc, summary_path, stderr, started, timeout_s=n / Q * 4 + 60, on_tick=tick, tick_s=TICK_S
        )
        tick()
    summary = result.summary or {}
    final = samples[-1]
    series = []
    for (t0, ok0, rej0), (t1, ok1, rej1) in itertools.pairwise(samples):
        if t1 > t0:
            series.append((t1, (ok1 - ok0) / (t1 - t0), (rej1 - rej0) / (t1 - t0)))
    changed = [s for s in samples if s[1] > 0]
    first = changed[0] if changed else samples[0]
    last = next((s for s in samples if s[1] == final[1]), final)
    server_rate = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else 0.0
    return {
        "rate": summary.get("ok", 0) / summary["wall_s"] if summary.get("wall_s") else 0.0,
        "wall": summary.get("wall_s", 0.0),
        "done": summary.get("done", 0),
        "failed": summary.get("errors", 0),
        "attempts": summary.get("attempts", 0),
        "by_code": summary.get("by_code", {}),
        "rejected": final[2],
        "answers": final[1] + final[2],
        "server_rate": server_rate,
        "series": series,
    }
