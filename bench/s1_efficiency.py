"""Section 1: client efficiency against the ideal rate, per concurrency.

Server: ``--tagger color --inject-latency-ms L``. For each concurrency C the client
(``batchtag run`` subprocess) tags distinct small JPEGs; achieved requests/s is compared
with ``min(C / L, server capacity)``, where the capacity is what wrk (a C load generator,
so no Python client overhead) gets from the same server build at latency 0. wrk is also
run at latency L with the same C, which separates what the client loses from what the
server (batch wait, per-request work, shared CPU) loses.
"""

from __future__ import annotations

from bench.common import (
    Ctx,
    Row,
    Section,
    fmt,
    image_set,
    load_generator,
    median,
    run_client,
    serve,
    write_manifest,
)
from bench.plots import line_plot

LATENCY_MS = 50.0
GOAL = 0.95


def run(ctx: Ctx) -> Section:
    section = Section("efficiency", "1. Client efficiency vs ideal (color tagger, injected latency 50 ms)")
    concurrencies = ctx.pick([1, 64], [1, 8, 32, 64, 128, 256])
    repeats = ctx.pick(1, 3)
    seconds = ctx.pick(1.0, 4.0)  # target length of one client run
    wrk_seconds = ctx.pick(1, 2)
    images = image_set(ctx, "small-unique", ctx.pick(200, 20_000), (256, 192), unique=True)
    sample = images[0].read_bytes()
    latency_s = LATENCY_MS / 1000

    with serve(ctx, latency_ms=0) as server:
        capacity, generator = load_generator(ctx, server.url, sample, 64, wrk_seconds)
    section.add(
        Row(
            f"server capacity, latency 0 ({generator}, 64 connections)",
            1,
            capacity.rate,
            "req/s",
            note=f"p50 {fmt(capacity.p50_ms)} ms; {capacity.bad} non-OK answers",
        )
    )

    achieved: dict[int, float] = {}
    wrk_at: dict[int, float] = {}
    ideal_at: dict[int, float] = {}
    share_at: dict[int, float] = {}
    with serve(ctx, latency_ms=LATENCY_MS) as server:
        one = write_manifest(ctx.work / "s1-one.txt", images[:1])
        start_up = run_client(ctx, [one], ctx.work / "s1-out.jsonl", server.url).cpu_s
        for c in concurrencies:
            reference, _ = load_generator(ctx, server.url, sample, c, wrk_seconds)
            wrk_at[c] = reference.rate
            ideal = min(c / latency_s, capacity.rate)
            ideal_at[c] = ideal
            n = max(ctx.pick(20, 40), min(len(images), int(ideal * seconds)))
            n = min(n, ctx.pick(200, 20_000))
            rates, server_us, client_us = [], [], []
            for repeat in range(repeats):
                start = (repeat * n) % max(1, len(images) - n + 1)
                manifest = write_manifest(ctx.work / "s1-manifest.txt", images[start : start + n])
                server_before = server.cpu_s()
                result = run_client(
                    ctx, [manifest], ctx.work / "s1-out.jsonl", server.url, "--concurrency", str(c)
                )
                server_us.append((server.cpu_s() - server_before) / n * 1e6)
                client_us.append(max(0.0, result.cpu_s - start_up) / n * 1e6)
                assert result.summary is not None
                if result.summary["ok"] != n:
                    section.notes.append(
                        f"C={c}: only {result.summary['ok']} of {n} ok: {result.summary['by_code']}"
                    )
                rates.append(result.summary["requests_per_s"])
            achieved[c] = median(rates)
            # Client and server share the 2 cores: once the server is saturated, every µs the
            # client spends is a µs the server does not get (wrk spends next to none).
            share_at[c] = median(server_us) / (median(server_us) + median(client_us))
            ratio = of_wrk(achieved[c], ideal)  # the same guarded division
            section.add(
                Row(
                    f"C={c}: batchtag req/s ({n} requests a run)",
                    repeats,
                    achieved[c],
                    "req/s",
                    ratio,
                    f">= {GOAL} of ideal {fmt(ideal)}",
                    ratio >= GOAL,
                    f"wrk same C and L: {fmt(reference.rate)} req/s (p50 {fmt(reference.p50_ms)} ms); "
                    f"batchtag/wrk = {of_wrk(achieved[c], reference.rate):.3f}; CPU a request: server "
                    f"{fmt(median(server_us))} µs, client {fmt(median(client_us))} µs (start-up "
                    f"subtracted): at saturation the client's share of 2 cores caps batchtag/wrk "
                    f"near {share_at[c]:.2f}",
                    rates,
                )
            )

    versus_wrk = {c: of_wrk(achieved[c], wrk_at[c]) for c in concurrencies}
    worst = min(concurrencies, key=lambda c: versus_wrk[c])
    section.add(
        Row(
            "batchtag / wrk at the same C and L, lowest over C",
            len(concurrencies),
            versus_wrk[worst],
            "x",
            versus_wrk[worst],
            f">= {GOAL} at every C",
            versus_wrk[worst] >= GOAL,
            f"at C={worst}; all: "
            + ", ".join(f"C={c}: {versus_wrk[c]:.2f}" for c in concurrencies)
            + f". Where the server is saturated (C >= capacity x latency = "
            f"{capacity.rate * LATENCY_MS / 1000:.0f}) client and server split 2 cores, so batchtag/wrk is "
            "capped near server CPU / (server + client CPU) a request: "
            + ", ".join(f"C={c}: {share_at[c]:.2f}" for c in concurrencies),
        )
    )
    misses = [c for c in concurrencies if not of_wrk(achieved[c], ideal_at[c]) >= GOAL]
    client_limited = [c for c in concurrencies if versus_wrk[c] < GOAL]
    section.notes.append(
        f"Ideal = min(C / {LATENCY_MS:g} ms, server capacity). Requests a run are sized to about "
        f"{seconds:g} s of ideal traffic (the issue's 20,000 would take 1,000 s at C=1); {repeats} runs, median."
    )
    if misses:
        section.notes.append(
            f"Goal missed at C={', '.join(map(str, misses))}. wrk, with no Python client at all, gets "
            + ", ".join(f"C={c}: {of_wrk(wrk_at[c], ideal_at[c]):.2f}" for c in misses)
            + " of the same ideal, so most of the shortfall is on the server side, not in the client: "
            "every request of a batch is answered when its whole batch is done (the color tagger spends "
            "~0.9 ms an image on the one tagger thread, batches of up to 16), the server's own work per "
            "request (~1 ms CPU, section 2) adds to the injected latency, and above ~700 req/s client and "
            "server share the 2 cores."
        )
    if client_limited:
        section.notes.append(
            "batchtag reaches < 0.95 of wrk at C="
            + ", ".join(map(str, client_limited))
            + ": client overhead."
        )
    else:
        section.notes.append(
            "batchtag is within 5% of wrk (or faster) at every C: the client is not the limit."
        )
    section.plots.append(
        line_plot(
            ctx.out / "efficiency.png",
            "Achieved request rate vs concurrency (latency 50 ms)",
            "concurrency C",
            "requests / s",
            concurrencies,
            {
                "batchtag run": [achieved[c] for c in concurrencies],
                "wrk (same C, same L)": [wrk_at[c] for c in concurrencies],
                "ideal min(C/L, capacity)": [ideal_at[c] for c in concurrencies],
            },
            logx=True,
            logy=True,
        )
    )
    return section


def of_wrk(achieved: float, reference: float) -> float:
    """A rate over a reference rate (wrk's, or the ideal); NaN when the reference is 0 (wrk
    got no answer at all on an overloaded machine), so one bad sample cannot crash the section."""
    return achieved / reference if reference > 0 else float("nan")
