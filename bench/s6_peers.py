"""Section 6: the provider's official Python SDK (qcloud-image 1.0.0) vs batchtag.

Same server (color tagger, latency 50 ms), same images, same concurrency C:
``Client.tag_detect`` in a plain loop, the same in a ThreadPoolExecutor of C threads,
and ``batchtag run --concurrency C``. The SDK has no endpoint setting: its service
address is a name-mangled class attribute of ``qcloud_image.conf.Conf``
(``_Conf__SERVICE_ADDR``), patched here to 127.0.0.1:PORT. It imports ``requests`` but
does not declare it as a dependency, so the bench extras install ``requests`` too.
If the SDK cannot be imported, an equivalent plain ``requests`` loop is measured instead
and labelled as such.
"""

from __future__ import annotations

import base64
import json
import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from batchtag import api
from batchtag.signing import sign
from bench.common import (
    BENCH_CREDS,
    Ctx,
    Row,
    Section,
    fmt,
    image_set,
    median,
    run_client,
    serve,
    write_manifest,
)
from bench.plots import bar_plot

LATENCY_MS = 50.0
CONCURRENCY = 32


def sdk_caller(url: str) -> tuple[Callable[[Path], bool], str]:
    """A function tagging one file and returning success, and what it is."""
    try:
        import qcloud_image
        from qcloud_image import CIFile, Client
        from qcloud_image.conf import Conf
    except ImportError as exc:  # e.g. requests missing
        return requests_caller(
            url
        ), f"plain HTTP POST per call, as the SDK does (qcloud-image unusable: {exc})"
    Conf._Conf__SERVICE_ADDR = url.split("//", 1)[1]  # type: ignore[attr-defined]
    client = Client(BENCH_CREDS.appid, BENCH_CREDS.secret_id, BENCH_CREDS.secret_key, "")

    def call(path: Path) -> bool:
        answer = client.tag_detect(CIFile(str(path)))
        return isinstance(answer, dict) and answer.get("code") == 0

    return call, f"qcloud-image {qcloud_image.__version__} Client.tag_detect"


def requests_caller(url: str) -> Callable[[Path], bool]:
    """What the SDK does (one ``requests.post`` a call, no session); urllib if requests is missing."""

    def body_and_headers(path: Path) -> tuple[str, dict[str, str]]:
        body = json.dumps({"appid": BENCH_CREDS.appid, "image": base64.b64encode(path.read_bytes()).decode()})
        return body, {"Authorization": sign(BENCH_CREDS), "Content-Type": "application/json"}

    try:
        import requests
    except ImportError:
        import urllib.request

        def call_urllib(path: Path) -> bool:
            body, headers = body_and_headers(path)
            request = urllib.request.Request(url + api.DETECT_PATH, body.encode(), headers, method="POST")
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read()).get("code") == 0

        return call_urllib

    def call(path: Path) -> bool:
        body, headers = body_and_headers(path)
        answer = requests.post(url + api.DETECT_PATH, data=body, headers=headers, timeout=30).json()
        return answer.get("code") == 0

    return call


def timed(call: Callable[[Path], bool], paths: list[Path], threads: int) -> tuple[float, float, int]:
    """(requests/s, CPU µs per request of this process, failures)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if threads <= 1:
        results = [call(p) for p in paths]
    else:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(call, paths))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return len(paths) / wall, cpu / len(paths) * 1e6, results.count(False)


def run(ctx: Ctx) -> Section:
    section = Section(
        "peers", f"6. Official SDK vs batchtag (color tagger, latency {LATENCY_MS:g} ms, C={CONCURRENCY})"
    )
    repeats = ctx.pick(1, 3)
    images = image_set(ctx, "small-unique", ctx.pick(200, 20_000), (256, 192), unique=True)
    n_loop, n_many = ctx.pick(20, 60), ctx.pick(100, 1000)
    results: dict[str, dict[str, Any]] = {}
    with serve(ctx, latency_ms=LATENCY_MS) as server:
        call, what = sdk_caller(server.url)
        for label, n, threads in (("loop", n_loop, 1), ("threads", n_many, CONCURRENCY)):
            runs = [timed(call, images[i * n : (i + 1) * n], threads) for i in range(repeats)]
            results[label] = {
                "rate": median([r[0] for r in runs]),
                "cpu": median([r[1] for r in runs]),
                "failed": sum(r[2] for r in runs),
                "n": n,
                "rates": [r[0] for r in runs],
            }
        manifest = write_manifest(ctx.work / "s6-manifest.txt", images[:n_many])
        one = write_manifest(ctx.work / "s6-one.txt", images[:1])
        start_up = run_client(ctx, [one], ctx.work / "s6-out.jsonl", server.url).cpu_s
        rates, cpus = [], []
        for _ in range(repeats):
            run_ = run_client(
                ctx, [manifest], ctx.work / "s6-out.jsonl", server.url, "--concurrency", str(CONCURRENCY)
            )
            assert run_.summary is not None
            rates.append(run_.summary["requests_per_s"])
            cpus.append((run_.cpu_s - start_up) / max(1, run_.summary["attempts"]) * 1e6)
        results["batchtag"] = {"rate": median(rates), "cpu": median(cpus), "n": n_many, "rates": rates}
    ideal = CONCURRENCY / (LATENCY_MS / 1000)
    bt = results["batchtag"]["rate"]
    sdk_runs = [
        ("loop", f"{what}, plain loop ({n_loop} requests a run)"),
        ("threads", f"{what}, ThreadPoolExecutor({CONCURRENCY}) ({n_many} requests a run)"),
    ]
    for key, label in sdk_runs:
        run = results[key]
        section.add(
            Row(
                label,
                repeats,
                run["rate"],
                "req/s",
                bt / run["rate"],
                "batchtag / this",
                None,
                f"CPU {fmt(run['cpu'])} µs/req; failures {run['failed']}",
                run["rates"],
            )
        )
    section.add(
        Row(
            f"batchtag run --concurrency {CONCURRENCY} ({n_many} requests a run)",
            repeats,
            bt,
            "req/s",
            bt / ideal,
            f"of ideal C/L = {ideal:g}",
            None,
            f"CPU {fmt(results['batchtag']['cpu'])} µs/req (client process, start-up subtracted); "
            f"SDK threads / batchtag CPU per request = {results['threads']['cpu'] / max(1e-9, results['batchtag']['cpu']):.2f}",
            results["batchtag"]["rates"],
        )
    )
    section.notes.append(
        "SDK findings: qcloud-image 1.0.0 imports `requests` without declaring it (pip installs it without "
        "its dependency; the bench extras add `requests`); it has no endpoint option (the host is a "
        "name-mangled class attribute, patched here); it posts with `requests.post` and no Session, so every "
        "call opens a new TCP connection; it has no retries, rate limiting or resume; its signatures live 30 s. "
        "SDK CPU is this (bench) process's user+sys per request, threads included. At C=32 both the SDK threads "
        "and batchtag hit the same server limit (see section 1: wrk gets ~0.6 of C/L there), so the req/s "
        "ratio mostly reflects the server; the CPU per request is the client-side difference."
    )
    section.plots.append(
        bar_plot(
            ctx.out / "peers.png",
            f"Requests/s at C={CONCURRENCY}, latency {LATENCY_MS:g} ms",
            "requests / s",
            {
                "SDK loop": results["loop"]["rate"],
                f"SDK {CONCURRENCY} threads": results["threads"]["rate"],
                f"batchtag C={CONCURRENCY}": bt,
            },
        )
    )
    return section
