"""Helpers shared by the benchmark sections: servers, clients, images, CPU and memory.

Everything runs on 127.0.0.1 and every wait is bounded in time. Child processes are
started with ``subprocess.Popen`` and reaped with ``os.wait4``, which returns the
resource usage (CPU time, peak RSS) of exactly that child.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import random
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from batchtag import api
from batchtag.signing import sign
from tests.support import (
    CREDENTIALS,
    batchtag_command,
    credentials_env,
    free_port,
    write_credentials,
)
from tests.support import wait_healthy as wait_url_healthy

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results"
WORK = REPO / "bench" / "work"  # generated inputs, git-ignored, reused between runs
EXAMPLES = REPO / "examples" / "photos"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = resource.getpagesize() // 1024

MAX_LINKS = 50_000
BENCH_CREDS = CREDENTIALS  # the test suite's one credential set


# --- results ---------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of a section's table."""

    what: str
    runs: int
    median: float | str
    unit: str = ""
    ratio: float | None = None  # the dimensionless figure compared with the goal
    goal: str = ""
    met: bool | None = None  # None: no goal
    note: str = ""
    samples: list[float] = field(default_factory=list)


@dataclass
class Section:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after the section

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row


@dataclass
class Ctx:
    """What every section gets: where to write, where to put inputs, how big to go."""

    out: Path
    work: Path
    quick: bool

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def goal_at_least(value: float, goal: float) -> bool:
    return value >= goal


# --- environment -------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import aiohttp
    import onnxruntime

    import batchtag

    return {
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "onnxruntime": onnxruntime.__version__,
        "batchtag": batchtag.__version__,
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "cpu_affinity": str(len(os.sched_getaffinity(0))),
        "cpu_model": _cpu_model(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# --- processes -----------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """user+sys CPU seconds of a live process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB of a live process; (0, 0) once it is gone."""
    rss = hwm = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


@dataclass
class ChildResult:
    returncode: int
    wall_s: float
    cpu_s: float  # user + sys of the child (and its own reaped children)
    user_s: float
    sys_s: float
    maxrss_kb: int  # VmHWM recorded by bench.peak at exit (ru_maxrss only as a fallback)
    summary: dict[str, Any] | None = None
    stderr: str = ""


def wait_child(
    proc: subprocess.Popen[bytes],
    timeout_s: float,
    interrupt_after_s: float | None = None,
    on_tick: Callable[[], None] | None = None,
    tick_s: float = 0.5,
) -> tuple[int, resource.struct_rusage]:
    """Reap ``proc`` with wait4 (its own rusage), SIGINT at ``interrupt_after_s``, SIGKILL at
    ``timeout_s``; ``on_tick`` is called every ``tick_s`` meanwhile (sampling)."""
    started = time.monotonic()
    next_tick = started
    interrupted = killed = False
    while True:
        if on_tick is not None and time.monotonic() >= next_tick:
            on_tick()
            next_tick += tick_s
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage
        elapsed = time.monotonic() - started
        if interrupt_after_s is not None and elapsed >= interrupt_after_s and not interrupted:
            proc.send_signal(signal.SIGINT)
            interrupted = True
        if elapsed >= timeout_s and not killed:
            proc.kill()
            killed = True
        time.sleep(0.01)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


# --- the server -----------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/stats", timeout=5) as response:
            return json.loads(response.read())

    def answered(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.stats()["responses"].items()}

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)


@contextlib.contextmanager
def serve(
    ctx: Ctx,
    tagger: str = "color",
    latency_ms: float = 0.0,
    qps_limit: float | None = None,
    allow_private_urls: bool = False,
    startup_timeout_s: float = 60.0,
    extra_args: Sequence[str] = (),
    port: int | None = None,
) -> Iterator[Server]:
    """``batchtag serve`` in a subprocess on a free port (or ``port``: a restart) with a
    temporary credentials file."""
    port = port or free_port()
    creds_dir = Path(tempfile.mkdtemp(prefix="bench-creds-", dir=ctx.work))
    creds_file = write_credentials(creds_dir / "credentials.json", BENCH_CREDS)
    args = batchtag_command(
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tagger",
        tagger,
        "--credentials",
        str(creds_file),
        "--inject-latency-ms",
        str(latency_ms),
    )
    if qps_limit is not None:
        args += ["--qps-limit", str(qps_limit)]
    if allow_private_urls:
        args.append("--allow-private-urls")
    args += extra_args
    log = ctx.work / f"server-{port}.log"
    with open(log, "wb") as log_handle:
        proc = subprocess.Popen(args, stdout=log_handle, stderr=subprocess.STDOUT, cwd=REPO)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_healthy(server, startup_timeout_s)
        yield server
    finally:
        stop_process(proc)
        shutil.rmtree(creds_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            log.unlink()


def wait_healthy(server: Server, timeout_s: float) -> None:
    try:
        wait_url_healthy(server.url, server.proc, timeout_s)
    except AssertionError as exc:
        raise RuntimeError(f"batchtag serve: {exc}: {server.log.read_text()[-2000:]}") from None


# --- the client ---------------------------------------------------------------------------------


def client_env() -> dict[str, str]:
    return dict(os.environ) | credentials_env(BENCH_CREDS)


def start_client(
    ctx: Ctx,
    sources: Sequence[str | Path],
    out: Path,
    endpoint: str | None,
    *options: str,
    fresh: bool = True,
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """``batchtag run`` as a subprocess; credentials through the environment, never argv.
    ``fresh`` deletes OUT first (a resume test keeps it)."""
    summary = out.with_suffix(".summary.json")
    peak = out.with_suffix(".peak")
    for path in (out, summary, peak) if fresh else (summary, peak):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    # bench.peak runs batchtag.cli.main unchanged and records its own VmHWM at exit.
    args = batchtag_command(
        "run",
        *map(str, sources),
        "-o",
        str(out),
        *(["--endpoint", endpoint] if endpoint else []),  # None: the endpoints of --config
        "--no-progress",
        "--summary-json",
        str(summary),
        *options,
        module="bench.peak",
    )
    stderr = out.with_suffix(".stderr")
    with open(stderr, "wb") as handle:
        env = client_env() | {"BENCH_PEAK_FILE": str(peak)}
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=handle, env=env, cwd=REPO)
    return proc, summary, stderr


def finish_client(
    proc: subprocess.Popen[bytes],
    summary: Path,
    stderr: Path,
    started: float,
    timeout_s: float,
    interrupt_after_s: float | None = None,
    on_tick: Callable[[], None] | None = None,
    tick_s: float = 0.5,
) -> ChildResult:
    code, usage = wait_child(proc, timeout_s, interrupt_after_s, on_tick, tick_s)
    data = json.loads(summary.read_text()) if summary.exists() else None
    peak = summary.with_suffix("").with_suffix(".peak")
    maxrss_kb = int(peak.read_text()) if peak.exists() and peak.read_text().strip() else usage.ru_maxrss
    return ChildResult(
        returncode=code,
        wall_s=time.monotonic() - started,
        cpu_s=usage.ru_utime + usage.ru_stime,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        maxrss_kb=maxrss_kb,
        summary=data,
        stderr=stderr.read_text(errors="replace")[-2000:] if stderr.exists() else "",
    )


def run_client(
    ctx: Ctx,
    sources: Sequence[str | Path],
    out: Path,
    endpoint: str | None,
    *options: str,
    timeout_s: float = 300.0,
    fresh: bool = True,
) -> ChildResult:
    started = time.monotonic()
    proc, summary, stderr = start_client(ctx, sources, out, endpoint, *options, fresh=fresh)
    result = finish_client(proc, summary, stderr, started, timeout_s)
    if result.summary is None:
        raise RuntimeError(f"batchtag run exited {result.returncode} without a summary: {result.stderr}")
    return result


# --- inputs ----------------------------------------------------------------------------------


def jpeg_bytes(size: tuple[int, int], seed: int, noise: float = 0.15, quality: int = 85) -> bytes:
    """A deterministic JPEG: a colour gradient with some noise (noise makes bytes grow)."""
    rng = random.Random(seed)
    base = Image.linear_gradient("L").resize(size)
    colour = tuple(rng.randrange(40, 255) for _ in range(3))
    image = Image.merge("RGB", [base.point(lambda v, c=c: v * c // 255) for c in colour])
    if noise:
        grain = Image.effect_noise(size, 255 * noise).convert("RGB")
        image = Image.blend(image, grain, noise)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def image_set(
    ctx: Ctx,
    name: str,
    count: int,
    size: tuple[int, int],
    noise: float = 0.15,
    quality: int = 85,
    distinct: int = 32,
    unique: bool = False,
) -> list[Path]:
    """``count`` image paths under work/NAME: ``distinct`` different JPEGs, hard-linked.

    ``unique``: copies instead of links, each with its own trailer after the JPEG's end
    marker (decoders ignore it), so every file has different bytes: batchtag sends
    identical bytes once, and a section that counts requests must not measure that.
    Cached: a marker file records what was made, so a second run reuses the files.
    """
    folder = ctx.work / name
    marker = folder / ".made"
    # Unchanged for linked sets, so caches made before ``unique`` existed stay valid (the
    # scale section keeps OUT files whose records match the tree's files as they are).
    spec = f"{count} {size} {noise} {quality} {distinct}" + (" unique" if unique else "")
    paths = [folder / f"{i // 1000:04d}" / f"{i:07d}.jpg" for i in range(count)]
    if marker.exists() and marker.read_text() == spec:
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    originals = []
    for seed in range(min(distinct, count)):
        original = folder / f"original-{seed}.jpg"
        original.write_bytes(jpeg_bytes(size, seed, noise, quality))
        originals.append(original)
    links = [0] * len(originals)
    for index, path in enumerate(paths):
        if index % 1000 == 0:
            path.parent.mkdir(exist_ok=True)
        slot = index % len(originals)
        if unique:
            path.write_bytes(originals[slot].read_bytes() + index.to_bytes(8, "big"))
            continue
        if links[slot] >= MAX_LINKS:  # ext4 allows 65,000 links to one inode: start a fresh copy
            copy = folder / f"original-{slot}-{index}.jpg"
            shutil.copyfile(originals[slot], copy)
            originals[slot], links[slot] = copy, 0
        os.link(originals[slot], path)
        links[slot] += 1
    marker.write_text(spec)
    return paths


def photo_set(
    ctx: Ctx, name: str, count: int, sources: Sequence[Path], render: Callable[[Image.Image], Image.Image]
) -> list[Path]:
    """``count`` paths under work/NAME: each source photo rendered once (``render`` on its RGB
    pixels, saved as a quality-90 JPEG), then hard-linked round-robin. Kept across bench runs
    while ``count`` matches, since rendering 4000 px photos takes longer than a quick run."""
    folder = ctx.work / name
    marker = folder / ".made"
    if marker.exists() and marker.read_text() == str(count):
        return sorted(p for p in folder.iterdir() if p.name.startswith("img-"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    originals = []
    for index, source in enumerate(sources):
        with Image.open(source) as image:
            photo = render(image.convert("RGB"))
        path = folder / f"original-{index}.jpg"
        photo.save(path, "JPEG", quality=90)
        originals.append(path)
    paths = []
    for i in range(count):
        path = folder / f"img-{i:05d}.jpg"
        os.link(originals[i % len(originals)], path)
        paths.append(path)
    marker.write_text(str(count))
    return paths


def unique_copies(ctx: Ctx, name: str, paths: Sequence[Path]) -> list[Path]:
    """Copies of ``paths`` under work/NAME, each with its own trailer (see ``image_set``)."""
    folder = ctx.work / name
    marker = folder / ".made"
    copies = [folder / f"{i:06d}{p.suffix}" for i, p in enumerate(paths)]
    if marker.exists() and marker.read_text() == str(len(paths)):
        return copies
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for index, (path, copy) in enumerate(zip(paths, copies, strict=True)):
        copy.write_bytes(path.read_bytes() + index.to_bytes(8, "big"))
    marker.write_text(str(len(paths)))
    return copies


def write_manifest(path: Path, lines: Sequence[str | Path] | Iterator[str]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(f"{line}\n")
    return path


def signed_body(image: bytes) -> tuple[bytes, str]:
    """A request body and a signature valid for an hour, for non-Python load generators."""
    import base64

    body = json.dumps({"appid": BENCH_CREDS.appid, "image": base64.b64encode(image).decode()}).encode()
    return body, sign(BENCH_CREDS, ttl=3600)


# --- wrk ---------------------------------------------------------------------------------------------

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "{auth}"
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) good = 0; bad = 0 end
function response(status, headers, body)
  if status == 200 and string.find(body, '"code": 0,', 1, true) then good = good + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local g, b = 0, 0
  for _, t in ipairs(threads) do g = g + t:get("good"); b = b + t:get("bad") end
  io.write(string.format("BENCH good=%d bad=%d duration_us=%d p50_us=%d p99_us=%d\\n",
    g, b, summary.duration, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class WrkResult:
    good: int
    bad: int
    duration_s: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.good / self.duration_s if self.duration_s else 0.0


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(ctx: Ctx, url: str, image: bytes, connections: int, seconds: float) -> WrkResult:
    body, auth = signed_body(image)
    script = ctx.work / "wrk-post.lua"
    script.write_text(WRK_SCRIPT.format(body=body.decode(), auth=auth))
    args = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url + api.DETECT_PATH,
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30, check=True)
    match = re.search(r"BENCH good=(\d+) bad=(\d+) duration_us=(\d+) p50_us=(\d+) p99_us=(\d+)", done.stdout)
    if not match:
        raise RuntimeError(f"wrk output not understood: {done.stdout[-500:]} {done.stderr[-500:]}")
    good, bad, duration, p50, p99 = (int(g) for g in match.groups())
    return WrkResult(good, bad, duration / 1e6, p50 / 1000, p99 / 1000)


async def _aiohttp_load(url: str, body: bytes, auth: str, connections: int, seconds: float) -> WrkResult:
    import asyncio

    import aiohttp

    good = bad = 0
    latencies: list[float] = []
    headers = {"Content-Type": "application/json", "Authorization": auth}
    deadline = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal good, bad
        while time.monotonic() < deadline:
            started = time.monotonic()
            async with session.post(url + api.DETECT_PATH, data=body, headers=headers) as response:
                data = await response.read()
            latencies.append(time.monotonic() - started)
            if response.status == 200 and b'"code": 0,' in data:
                good += 1
            else:
                bad += 1

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0  # noqa: E731
    return WrkResult(good, bad, time.monotonic() - started, pick(0.5), pick(0.99))


def load_generator(
    ctx: Ctx, url: str, image: bytes, connections: int, seconds: float
) -> tuple[WrkResult, str]:
    """wrk when installed, else an aiohttp loop (labelled: it shares Python's overheads)."""
    if have_wrk():
        return run_wrk(ctx, url, image, connections, seconds), "wrk"
    import asyncio

    body, auth = signed_body(image)
    return asyncio.run(
        _aiohttp_load(url, body, auth, connections, seconds)
    ), "aiohttp fallback (wrk not installed)"


def fmt(value: float, digits: int = 3) -> str:
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}g}"


def new_token() -> str:
    return secrets.token_hex(4)
