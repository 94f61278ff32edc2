"""Section 2: client CPU cost per request against a bare aiohttp loop, and a profile.

CPU is user+sys of the ``batchtag run`` child from ``os.wait4`` (that process only),
minus the same for a one-item run (interpreter start, imports, session set-up), divided
by the extra requests. The baseline, ``bench/bare_client.py`` (one session, one signature,
``json.dumps`` of the body, the JSON answer read), is measured the same way on the same
server right after each batchtag run. The server's own CPU per request is read from /proc for
comparison. Then the client runs once in-process under pyinstrument; the profile text
is saved and its samples are summed by library to say what dominates.
"""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_CREDS,
    REPO,
    Ctx,
    Row,
    Section,
    client_env,
    fmt,
    image_set,
    median,
    run_client,
    serve,
    wait_child,
    write_manifest,
)
from bench.plots import bar_plot

CONCURRENCY = 64
BARE_GOAL = 1.2  # batchtag's client CPU per request over the bare aiohttp loop's


def run(ctx: Ctx) -> Section:
    section = Section("cost", f"2. Client CPU cost per request (C={CONCURRENCY}, server latency 0)")
    repeats = ctx.pick(1, 5)  # paired CPU ratios drift +-15 % run to run here: 5 pairs, median
    sets = {
        # 4 KB: thumbnails; the fixed per-request cost weighs most here (issue 22 measured
        # 1.29-1.34x at 4 KB when this section's 10 KB row said 1.03x).
        "4 KB": (
            image_set(ctx, "tiny-unique", ctx.pick(200, 20_000), (160, 120), unique=True),
            ctx.pick(200, 3000),
        ),
        "10 KB": (
            image_set(ctx, "small-unique", ctx.pick(200, 20_000), (256, 192), unique=True),
            ctx.pick(200, 3000),
        ),
        "1 MB": (
            image_set(
                ctx,
                "large1mb",
                ctx.pick(20, 300),
                (1400, 1000),
                noise=0.5,
                quality=92,
                distinct=8,
                unique=True,
            ),
            ctx.pick(20, 300),
        ),
    }
    per_request: dict[str, float] = {}
    with serve(ctx, latency_ms=0) as server:
        for label, (images, n) in sets.items():
            size_kb = images[0].stat().st_size / 1024
            one = write_manifest(ctx.work / "s2-one.txt", images[:1])
            many = write_manifest(ctx.work / "s2-many.txt", images[:n])
            costs, bare_costs, ratios, server_costs, rates = [], [], [], [], []
            for _ in range(repeats):  # batchtag and the bare loop alternate on the same server
                base = run_client(
                    ctx, [one], ctx.work / "s2-out.jsonl", server.url, "--concurrency", str(CONCURRENCY)
                )
                server_before = server.cpu_s()
                full = run_client(
                    ctx, [many], ctx.work / "s2-out.jsonl", server.url, "--concurrency", str(CONCURRENCY)
                )
                server_after = server.cpu_s()
                assert full.summary is not None
                requests = full.summary["attempts"]
                costs.append((full.cpu_s - base.cpu_s) / max(1, requests - 1) * 1e6)
                server_costs.append((server_after - server_before) / max(1, requests) * 1e6)
                rates.append(full.summary["requests_per_s"])
                if full.summary["ok"] != n:
                    section.notes.append(
                        f"{label}: {full.summary['ok']} of {n} ok ({full.summary['by_code']})"
                    )
                bare_costs.append(bare_cpu_per_request(ctx, server.url, one, many, n))
                ratios.append(costs[-1] / bare_costs[-1])
            per_request[label] = median(costs)
            section.add(
                Row(
                    f"client CPU per request, {label} JPEG ({size_kb:,.0f} KiB, {n} requests)",
                    repeats,
                    per_request[label],
                    "µs",
                    note=(
                        f"server CPU {fmt(median(server_costs))} µs/req; {fmt(median(rates))} req/s; "
                        f"client start-up (1-item run) {base.cpu_s * 1000:,.0f} ms CPU, subtracted"
                    ),
                    samples=costs,
                )
            )
            section.add(
                Row(
                    f"bare aiohttp loop CPU per request, {label} JPEG (bench/bare_client.py)",
                    repeats,
                    median(bare_costs),
                    "µs",
                    median(ratios),
                    f"batchtag / bare <= {BARE_GOAL}",
                    median(ratios) <= BARE_GOAL,
                    "ratio = batchtag's CPU per request over the bare loop's, each run paired with the "
                    "batchtag run just before it; median of the pairs",
                    bare_costs,
                )
            )
        profile_text, by_library = profile_client(ctx, server.url, sets["10 KB"][0][: ctx.pick(200, 2000)])
    profile_path = ctx.out / "profile-client.txt"
    profile_path.write_text(profile_text)
    idle = by_library.pop("idle (waiting in epoll)", 0.0)
    total = sum(by_library.values()) or 1.0
    ranked = sorted(by_library.items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{name} {seconds / total:.0%}" for name, seconds in ranked[:6])
    section.notes.append(
        f"Profile ({'cProfile: pyinstrument not installed' if 'cProfile' in profile_text[:80] else 'pyinstrument'}, "
        f"in-process run_batch, 10 KB images, C={CONCURRENCY}) saved to "
        f"{profile_path.name}. The event-loop thread was idle in epoll {idle / (idle + total):.0%} of the "
        f"time; its busy time by library (built-ins counted for their caller): {top}."
    )
    section.plots.append(
        bar_plot(
            ctx.out / "profile-by-library.png",
            "Client event-loop thread: busy time by library (10 KB images)",
            "share of busy samples",
            {name: seconds / total for name, seconds in ranked[:8]},
        )
    )
    return section


def bare_cpu_per_request(ctx: Ctx, url: str, one: Path, many: Path, n: int) -> float:
    """CPU µs per request of bench/bare_client.py: (n-request run - 1-request run) / (n - 1)."""
    cpu = []
    for manifest in (one, many):
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bare_client", url, str(manifest), str(CONCURRENCY)],
            stdout=subprocess.PIPE,
            env=client_env(),
            cwd=REPO,
        )
        _, usage = wait_child(proc, timeout_s=300)
        assert proc.stdout is not None
        done = json.loads(proc.stdout.read())
        cpu.append(usage.ru_utime + usage.ru_stime)
    if done["ok"] != n:
        raise RuntimeError(f"bare client: {done['ok']} of {n} ok")
    return (cpu[1] - cpu[0]) / max(1, n - 1) * 1e6


def profile_client(ctx: Ctx, url: str, images: list[Path]) -> tuple[str, dict[str, float]]:
    from batchtag.config import RunConfig
    from batchtag.pipeline.batch import run_batch

    manifest = write_manifest(ctx.work / "s2-profile.txt", images)
    out = ctx.work / "s2-profile.jsonl"
    out.unlink(missing_ok=True)
    config = RunConfig(
        sources=[str(manifest)],
        out=str(out),
        endpoint=url,
        appid=BENCH_CREDS.appid,
        secret_id=BENCH_CREDS.secret_id,
        secret_key=BENCH_CREDS.secret_key,
        concurrency=CONCURRENCY,
        progress=False,
    )
    try:
        from pyinstrument import Profiler
    except ImportError:  # bench extras not installed: the standard library's profiler instead
        return cprofile_client(config)
    # async_mode disabled: samples show what the event-loop thread really runs, idle included.
    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    summary = asyncio.run(run_batch(config, progress=False))
    profiler.stop()
    header = f"# batchtag run in-process: {summary.done} items, {summary.items_per_s:.0f} items/s\n"
    text = profiler.output_text(unicode=False, color=False, show_all=False)
    lines = text.splitlines()
    by_library: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    root = profiler.last_session.root_frame() if profiler.last_session else None
    if root is not None:
        _sum_self_time(root, by_library, by_function)
    total = sum(by_library.values()) or 1.0
    table = ["", "# self time by library (built-ins count for their caller)"]
    table += [f"{seconds / total:6.1%}  {name}" for name, seconds in by_library.most_common()]
    table += ["", "# top functions by self time"]
    table += [f"{seconds / total:6.1%}  {name}" for name, seconds in by_function.most_common(25)]
    return header + "\n".join(lines[:160] + table) + "\n", dict(by_library)


def cprofile_client(config: Any) -> tuple[str, dict[str, float]]:
    import cProfile
    import io
    import pstats

    from batchtag.pipeline.batch import run_batch

    profiler = cProfile.Profile()
    profiler.enable()
    summary = asyncio.run(run_batch(config, progress=False))
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(40)
    by_library: collections.Counter[str] = collections.Counter()
    for (path, _, function), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        by_library[_library(path, function) or "built-ins"] += tottime
    header = (
        "# pyinstrument not installed: cProfile (deterministic, higher overhead) instead\n"
        f"# batchtag run in-process: {summary.done} items, {summary.items_per_s:.0f} items/s\n"
    )
    return header + stream.getvalue(), dict(by_library)


def _sum_self_time(
    root: Any, by_library: collections.Counter[str], by_function: collections.Counter[str]
) -> None:
    """Self time by library; native and built-in frames count for the library that called them."""
    stack = [(root, "other", "")]
    while stack:
        node, inherited, parent = stack.pop()
        path = node.file_path or ""
        library = _library(path, node.function or "") or inherited
        if node.is_synthetic or (node.function or "").startswith("["):
            name = f"{parent} [self]"  # pyinstrument's [self] leaf: time in the parent function itself
        else:
            name = f"{node.function} ({node.file_path_short or path or 'built-in'})"
        # A frame's self time is also carried by its synthetic [self] child: count leaves only.
        own = 0.0 if node.children else node.total_self_time
        by_library[library] += own
        if own:
            by_function[name] += own
        stack.extend((child, library, name) for child in node.children)


def _library(path: str, function: str) -> str | None:
    """The library of a frame's file, or None for built-in/native frames (inherit the caller's)."""
    waiting = "poll" in function or "select" in function
    native = not path or path.startswith(("<", "[", "~"))  # "~": cProfile's built-ins
    if waiting and (native or "selectors.py" in path):
        return "idle (waiting in epoll)"
    if native:
        return None
    for name in ("aiohttp", "yarl", "multidict", "tenacity", "aiofiles", "batchtag", "pyinstrument", "PIL"):
        if f"/{name}/" in path:
            return name
    for name in ("asyncio", "json", "concurrent", "ssl", "base64", "hmac", "secrets", "random"):
        if f"/{name}/" in path or path.endswith(f"/{name}.py"):
            return name
    if "site-packages" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    return "stdlib (other)"
