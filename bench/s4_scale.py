"""Section 4: scale. Memory and start-up with huge inputs, and resume over a million records.

* URL manifests (.txt, 100k and 1M lines) pointing at a local image host, against a color
  server with ``--allow-private-urls``; and a 200k-file directory tree (hard links to one
  small JPEG). Each client runs for a bounded time, then gets SIGINT (exit 130 expected):
  peak RSS (``ru_maxrss`` from wait4), RSS sampled from /proc every 50 ms, time from spawn
  to the server's first answer, items/s reached.
* Resume: OUT already holds a valid record (``Record.to_line`` layout) for every key of
  the manifest; ``batchtag run`` must skip them all and exit 0. Wall time is from spawn to
  exit; extra memory is its peak RSS minus that of the same command with one item.
  The same over a directory tree of hard links whose records carry file facts and
  settings: the change check (one stat a file from the walk, size and mtime compared with
  the record's) is inside the figure.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchtag.config import public_endpoint
from batchtag.records import FileFacts, Record, Settings
from bench.common import (
    REPO,
    Ctx,
    Row,
    Section,
    finish_client,
    fmt,
    free_port,
    image_set,
    proc_rss_kb,
    run_client,
    serve,
    start_client,
    stop_process,
    write_manifest,
)
from bench.plots import line_plot

RSS_GOAL_MB = 150.0
RESUME_GOAL_S = 5.0
TICK_S = 0.05


@contextlib.contextmanager
def image_host(ctx: Ctx, image: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.static_server", str(port), str(image)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/probe.jpg", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the bench image host did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        stop_process(proc)


def run(ctx: Ctx) -> Section:
    big, small = ctx.pick(100_000, 1_000_000), ctx.pick(10_000, 100_000)
    tree_files = ctx.pick(5_000, 200_000)
    bounded_s = ctx.pick(1.5, 15.0)
    section = Section(
        "scale", f"4. Scale: {big:,}-line manifest, {tree_files:,}-file tree, resume over {big:,} records"
    )
    tree = image_set(ctx, "tree", tree_files, (256, 192), distinct=1)
    tree_root = tree[0].parent.parent
    series: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    bounded: dict[str, dict[str, Any]] = {}
    with serve(ctx, latency_ms=0, allow_private_urls=True) as server, image_host(ctx, tree[0]) as host:
        for label, n in ((f"{small:,} URLs", small), (f"{big:,} URLs", big)):
            manifest = write_manifest(ctx.work / "s4-urls.txt", (f"{host}/img/{i:07d}.jpg" for i in range(n)))
            bounded[label] = bounded_run(ctx, server, manifest, bounded_s)
        bounded[f"{tree_files:,}-file tree"] = bounded_run(ctx, server, tree_root, bounded_s)
    for label, result in bounded.items():
        mb = result["maxrss_kb"] / 1024
        section.add(
            Row(
                f"bounded run, {label}: peak RSS",
                1,
                mb,
                "MB",
                mb / RSS_GOAL_MB,
                f"< {RSS_GOAL_MB:g} MB",
                mb < RSS_GOAL_MB,
                f"first answer {result['ttfr']:.2f} s after spawn; {result['done']:,} items in {bounded_s:g} s "
                f"({fmt(result['rate'])} items/s); exit {result['code']} after SIGINT",
            )
        )
        times[label] = [t for t, _ in result["rss"]]
        series[label] = [kb / 1024 for _, kb in result["rss"]]
    small_rss = bounded[f"{small:,} URLs"]["maxrss_kb"]
    big_rss = bounded[f"{big:,} URLs"]["maxrss_kb"]
    flat = big_rss / small_rss
    section.add(
        Row(f"peak RSS {big:,} URLs / {small:,} URLs", 1, flat, "x", flat, "<= 1.10 (flat)", flat <= 1.10)
    )
    ttfr_ratio = bounded[f"{big:,} URLs"]["ttfr"] / max(1e-3, bounded[f"{small:,} URLs"]["ttfr"])
    section.add(
        Row(
            f"time to first answer {big:,} / {small:,} URLs",
            1,
            ttfr_ratio,
            "x",
            ttfr_ratio,
            "~1 (independent of input size)",
            ttfr_ratio < 1.5,
        )
    )

    resume_runs = resume(ctx, [ctx.pick(1_000, small), big])
    resume_runs.update(resume_tree(ctx, big))
    for n, result in resume_runs.items():
        if n == 1:
            continue
        extra = (result["maxrss_kb"] - resume_runs[1]["maxrss_kb"]) / 1024
        what = f"{n:,} URLs" if isinstance(n, int) else n
        section.add(
            Row(
                f"resume, {what} all done: wall time (spawn to exit)",
                1,
                result["wall"],
                "s",
                result["wall"] / RESUME_GOAL_S,
                f"< {RESUME_GOAL_S:g} s",
                result["wall"] < RESUME_GOAL_S,
                f"extra peak RSS vs a 1-item resume: {extra:.1f} MB "
                f"({extra * 1024 * 1024 / result['items']:.0f} B/item), peak {result['maxrss_kb'] / 1024:.0f} MB; "
                f"exit {result['code']}, skipped {result['skipped']:,}, records written {result['written']}, "
                f"OUT grew {result['grew']} bytes",
            )
        )
    section.notes.append(
        f"Bounded runs stop after {bounded_s:g} s (SIGINT), so the {big:,}-item inputs are not processed "
        "to the end: the rows report the rate reached, and the peak RSS over that window (RSS sampled every "
        "50 ms is in the plot). URL items are fetched by the server from a local image host (same 10 KB "
        "JPEG), so client, server and host share the 2 cores."
    )
    for n in [n for n, r in resume_runs.items() if n != 1 and r["wall"] >= RESUME_GOAL_S]:
        what = f"{n:,} done URLs" if isinstance(n, int) else f"the {n}"
        why = (
            "resume.read_checkpoint (one fingerprint per OUT line) and the producer's walk over the "
            "manifest (resume.ResumeFilter: one fingerprint per item, one vectorised lookup per chunk)"
            if isinstance(n, int)
            else "the walk (~10 µs a file) and the change check: one stat a file, which the URL "
            "resume does not need"
        )
        section.notes.append(
            f"Resume of {what} takes {resume_runs[n]['wall']:.1f} s, "
            f"{resume_runs[n]['wall'] / RESUME_GOAL_S:.1f}x the goal. Where the time goes: {why}."
        )
    section.notes.append(
        f"Resume baseline (1 item): peak RSS {resume_runs[1]['maxrss_kb'] / 1024:.1f} MB, "
        f"{resume_runs[1]['wall']:.2f} s (interpreter and imports)."
    )
    longest = max(times.values(), key=len)
    section.plots.append(
        line_plot(
            ctx.out / "scale-rss.png",
            "Client RSS during bounded runs",
            "seconds since spawn",
            "RSS (MB)",
            longest,
            series,
            hlines={f"goal {RSS_GOAL_MB:g} MB": RSS_GOAL_MB},
        )
    )
    return section


def bounded_run(ctx: Ctx, server: Any, source: Path, seconds: float) -> dict[str, Any]:
    before = sum(server.answered().values())
    rss: list[tuple[float, int]] = []
    first: list[float] = []
    hwm = [0]
    started = time.monotonic()
    proc, summary_path, stderr = start_client(
        ctx, [source], ctx.work / "s4-out.jsonl", server.url, "--concurrency", "64"
    )

    def tick() -> None:
        now = time.monotonic() - started
        kb, high = proc_rss_kb(proc.pid)
        if kb:
            rss.append((now, kb))
        hwm[0] = max(hwm[0], high)
        if not first and sum(server.answered().values()) > before:
            first.append(now)

    result = finish_client(
        proc,
        summary_path,
        stderr,
        started,
        timeout_s=seconds + 30,
        interrupt_after_s=seconds,
        on_tick=tick,
        tick_s=TICK_S,
    )
    out = ctx.work / "s4-out.jsonl"
    done = 0
    if out.exists():
        with open(out, "rb") as handle:
            done = sum(1 for _ in handle)
    wall = (result.summary or {}).get("wall_s") or seconds
    # A run stopped by SIGINT leaves through os._exit, so bench.peak's exit hook does not write
    # its peak file, and wait4's figure counts this (model-loaded) bench process's pages from
    # before exec. The client's own VmHWM, sampled every tick, is its peak then.
    own_peak = (ctx.work / "s4-out.peak").exists()
    return {
        "maxrss_kb": result.maxrss_kb if own_peak else hwm[0],
        "ttfr": first[0] if first else float("nan"),
        "done": done,
        "rate": done / wall,
        "code": result.returncode,
        "rss": rss,
    }


def records_file(ctx: Ctx, n: int) -> tuple[Path, Path]:
    """A manifest of n URLs and an OUT with an ok record for each (cached in bench/work)."""
    manifest, out = ctx.work / f"resume-{n}.txt", ctx.work / f"resume-{n}.jsonl"
    marker = ctx.work / f"resume-{n}.made"
    if marker.exists() and out.exists() and manifest.exists():
        return manifest, out
    key = "https://img.example.invalid/{:07d}.jpg"
    settings = Settings(public_endpoint(RESUME_ENDPOINT))
    tags = [{"tag_name": "红", "tag_confidence": 81}, {"tag_name": "明亮", "tag_confidence": 64}]
    template = Record(
        "@KEY@", "url", "ok", 0, "success", tags, 1, {"elapsed_ms": 12}, settings=settings
    ).to_line()
    head, tail = template.decode().split("@KEY@")
    assert Record(
        key.format(0), "url", "ok", 0, "success", tags, 1, {"elapsed_ms": 12}, settings=settings
    ).to_line().decode() == (head + key.format(0) + tail)
    write_manifest(manifest, (key.format(i) for i in range(n)))
    with open(out, "w", encoding="utf-8") as handle:
        for start in range(0, n, 10_000):
            handle.write("".join(head + key.format(i) + tail for i in range(start, min(n, start + 10_000))))
    marker.write_text("ok")
    return manifest, out


def resume(ctx: Ctx, sizes: list[int]) -> dict[int, dict[str, Any]]:
    results = {}
    for n in [1, *sizes]:
        manifest, out = records_file(ctx, n)
        results[n] = resume_once(ctx, manifest, out, n)
    return results


def resume_once(ctx: Ctx, source: Path, out: Path, n: int) -> dict[str, Any]:
    """One resume run over ``source`` with OUT complete: wall time, peak RSS, what it wrote."""
    size_before = out.stat().st_size
    run = run_client(ctx, [source], out, RESUME_ENDPOINT, "--concurrency", "64", fresh=False, timeout_s=120)
    summary = run.summary or {}
    return {
        "items": n,
        "wall": run.wall_s,
        "maxrss_kb": run.maxrss_kb,
        "code": run.returncode,
        "skipped": summary.get("skipped_done", 0),
        "written": summary.get("done", 0),
        "grew": out.stat().st_size - size_before,
    }


RESUME_ENDPOINT = "http://127.0.0.1:9"  # nothing listens: a resume with all done sends nothing


def resume_tree(ctx: Ctx, n: int) -> dict[str, dict[str, Any]]:
    """Resume over an n-file tree (hard links) whose OUT has a current record for each file:
    the walk stats every file and compares size and mtime with its record."""
    paths = image_set(ctx, "resume-tree", n, (64, 48), distinct=16)
    root = paths[0].parent.parent
    paths = sorted(root.glob("original-*.jpg")) + paths  # the link targets are in the tree too
    out = ctx.work / f"resume-tree-{n}.jsonl"
    marker = ctx.work / f"resume-tree-{n}.made"
    if not (marker.exists() and out.exists()):
        tags = [{"tag_name": "红", "tag_confidence": 81}, {"tag_name": "明亮", "tag_confidence": 64}]
        settings = Settings(public_endpoint(RESUME_ENDPOINT))
        facts: dict[int, FileFacts] = {}
        with open(out, "wb") as handle:
            for start in range(0, len(paths), 10_000):
                lines = []
                for path in paths[start : start + 10_000]:
                    info = path.stat()
                    if info.st_ino not in facts:
                        facts[info.st_ino] = FileFacts(info.st_size, info.st_mtime_ns, f"{info.st_ino:032x}")
                    lines.append(
                        Record(
                            str(path),
                            "file",
                            "ok",
                            0,
                            "success",
                            tags,
                            1,
                            {"elapsed_ms": 12},
                            file=facts[info.st_ino],
                            settings=settings,
                        ).to_line()
                    )
                handle.write(b"".join(lines))
        marker.write_text("ok")
    return {f"{n:,}-file tree (change checks)": resume_once(ctx, root, out, n)}
