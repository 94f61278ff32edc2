"""What the tests (and ``bench/``) share: one credential set, one image factory, one
subprocess harness for `batchtag serve` / `batchtag run`, and strict checks of OUT.

Every subprocess is started through a ``Spawner`` whose ``close()`` kills what is still
running (by its own pid), and writes its output to files, never to a pipe nobody reads.
Waits are on readiness signals (a healthy server, lines in OUT), each bounded in time.
This module imports no pytest, so the benchmarks can use it too.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from batchtag import api
from batchtag.config import RunConfig
from batchtag.signing import Credentials, sign

# The one credential set of the suite. The key is distinctive so a test that searches
# logs, records and errors for it cannot match by accident.
CREDENTIALS = Credentials(
    appid="1000001", secret_id="AKIDtestSecretId0001", secret_key="SUPERSECRET-test-key-7f3a9c"
)


# --- credentials and signed requests -----------------------------------------------------------


def write_credentials(path: Path, credentials: Credentials = CREDENTIALS) -> Path:
    """A `batchtag serve --credentials` file (JSON), readable only by its owner."""
    entry = {
        "appid": credentials.appid,
        "secret_id": credentials.secret_id,
        "secret_key": credentials.secret_key,
    }
    path.write_text(json.dumps({"credentials": [entry]}))
    path.chmod(0o600)
    return path


def credentials_env(credentials: Credentials = CREDENTIALS) -> dict[str, str]:
    """The environment variables `batchtag run` reads its credentials from (never argv)."""
    return {
        "BATCHTAG_APPID": credentials.appid,
        "BATCHTAG_SECRET_ID": credentials.secret_id,
        "BATCHTAG_SECRET_KEY": credentials.secret_key,
    }


def signed_headers(creds: Credentials = CREDENTIALS, bucket: str = "", **sign_options: Any) -> dict[str, str]:
    """Headers for one API request; ``sign_options`` go to ``signing.sign`` (ttl, now, rand)."""
    return {"Authorization": sign(creds, bucket, **sign_options), "Content-Type": "application/json"}


def run_config(server: Any, creds: Credentials, sources: list[Any], out: Any, **overrides: Any) -> RunConfig:
    """A RunConfig against ``server`` (anything with a ``url``): the settings end-to-end
    tests share, overridable."""
    options: dict[str, Any] = {
        "sources": [str(s) for s in sources],
        "out": str(out),
        "endpoint": server.url,
        "appid": creds.appid,
        "secret_id": creds.secret_id,
        "secret_key": creds.secret_key,
        "concurrency": 8,
        "retries": 3,
        "timeout": 10.0,
        "progress": False,
    }
    return RunConfig(**(options | overrides))


# --- images ------------------------------------------------------------------------------------


def encode_image(fmt: str = "JPEG", size: tuple[int, int] = (64, 48), color: Any = (200, 30, 30)) -> bytes:
    """A solid-colour image file in ``fmt`` (JPEG, PNG, BMP, GIF, ...): the suite's one factory."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def noisy_jpeg(size: tuple[int, int], seed: int = 7) -> bytes:
    """A real JPEG that does not compress (random pixels): for size limits and resizing."""
    pixels = random.Random(seed).randbytes(size[0] * size[1] * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a comment segment after SOI: the same pixels, other bytes (so
    identical-content reuse does not merge test images that are meant to be distinct)."""
    comment = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def tiny_jpegs(root: Path, n: int, variety: int = 24) -> list[str]:
    """``n`` small JPEG files (``variety`` distinct pictures, every file's bytes unique) in
    ``root``; their keys, sorted."""
    root.mkdir(parents=True, exist_ok=True)
    contents = [
        encode_image(size=(16, 12), color=(i * 10 % 256, 200 - i * 7 % 200, 60)) for i in range(variety)
    ]
    paths = []
    for i in range(n):
        path = root / f"img{i:06}.jpg"
        path.write_bytes(with_comment(contents[i % variety], path.name))
        paths.append(str(path))
    return sorted(paths)


def hard_links(targets: Path | list[Path], directory: Path, n: int, prefix: str = "l") -> list[str]:
    """``n`` hard links to ``targets`` (in turn) in ``directory``: distinct keys, few inodes.
    (ext4 allows 65,000 links to one inode: give several targets for more.)"""
    targets = targets if isinstance(targets, list) else [targets]
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(directory, f"{prefix}{i:06}.jpg")
        os.link(targets[i % len(targets)], path)
        paths.append(path)
    return sorted(paths)


# --- subprocesses: the one harness ----------------------------------------------------------------


def batchtag_command(*args: Any, module: str = "batchtag") -> list[str]:
    """argv for `batchtag ARGS` in this interpreter (``module`` = bench.peak wraps it)."""
    return [sys.executable, "-m", module, *map(str, args)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_flags(url: str, credentials: Credentials = CREDENTIALS) -> list[str]:
    """`batchtag run` flags pointing at a server started by ``Spawner.serve``. (Tests of
    the flags themselves use this; credentials_env keeps the key out of argv.)"""
    return [
        "--endpoint",
        url,
        "--appid",
        credentials.appid,
        "--secret-id",
        credentials.secret_id,
        "--secret-key",
        credentials.secret_key,
    ]


def run_cli(*args: Any, timeout: float = 120, env: dict[str, str] | None = None, **kwargs: Any):
    """`batchtag ARGS` to completion; output captured as text."""
    return subprocess.run(
        batchtag_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


LOCAL_RUN = ["--tagger", "color", "--no-progress"]  # the embedded server, the cheap tagger
NO_ENV_ENDPOINT = {"BATCHTAG_ENDPOINT": ""}


def run_local(*args: Any, **kwargs: Any):
    """`batchtag run ARGS` against the embedded server with the color tagger, to completion."""
    return run_cli("run", *args, *LOCAL_RUN, env=NO_ENV_ENDPOINT, **kwargs)


def assert_refused(result: Any, *words: str) -> None:
    """The CLI error contract: exit 2, one line on stderr naming ``words``, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a SIGTERM handler yet (SigCgt in /proc): a readiness
    signal that needs no help from the program."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def wait_until(condition: Callable[[], bool], timeout: float, what: str, alive: Any = None) -> None:
    """Poll ``condition`` until true; fail after ``timeout`` s or when the process ``alive``
    (anything with ``poll()``) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"process exited ({alive.poll()}) before {what}")
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def is_healthy(url: str) -> bool:
    try:
        return http_get(url + api.HEALTH_PATH, timeout=1)[0] == 200
    except OSError:
        return False


def wait_healthy(url: str, proc: Any = None, timeout: float = 60.0) -> None:
    """Until ``url``'s /healthz answers 200 (the tagger is loaded)."""
    wait_until(lambda: is_healthy(url), timeout, f"{url} to be healthy", alive=proc)


@dataclass
class Proc:
    """A started subprocess and the files holding its stdout and stderr."""

    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it does not go."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(timeout=timeout)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


class Spawner:
    """Starts `batchtag` subprocesses with output in ``workdir``; ``close()`` kills the survivors."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Proc] = []

    def start(
        self,
        *args: Any,
        name: str = "proc",
        env: dict[str, str] | None = None,
        module: str = "batchtag",
        **kwargs: Any,
    ) -> Proc:
        """`python -m batchtag ARGS...` (or another ``module``) in a subprocess."""
        return self.start_program(batchtag_command(*args, module=module), name=name, env=env, **kwargs)

    def start_program(
        self, argv: list[Any], name: str = "proc", env: dict[str, str] | None = None, **kwargs: Any
    ) -> Proc:
        """Any program (``argv``), e.g. the `dask` CLI."""
        index = len(self.started)
        out = self.workdir / f"{name}-{index}.out"
        err = self.workdir / f"{name}-{index}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            popen = subprocess.Popen(
                [str(a) for a in argv],
                stdout=stdout,
                stderr=stderr,
                stdin=kwargs.pop("stdin", subprocess.DEVNULL),
                env={**os.environ, **(env or {})},
                **kwargs,
            )
        proc = Proc(popen, out, err)
        self.started.append(proc)
        return proc

    def serve(
        self, credentials: Path, *extra: Any, port: int | None = None, name: str = "serve"
    ) -> tuple[Proc, str]:
        """`batchtag serve --tagger color` on ``port`` (a free one by default), healthy on return."""
        port = port or free_port()
        proc = self.start(
            "serve", "--tagger", "color", "--port", port, "--credentials", credentials, *extra, name=name
        )
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc.popen)
        return proc, url

    def close(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.popen.kill()
                proc.popen.wait(timeout=15)


# --- OUT --------------------------------------------------------------------------------------


@dataclass
class OutFile:
    records: list[dict[str, Any]]
    torn: bytes  # bytes after the last newline: a record a crash cut in half

    @property
    def keys(self) -> list[str]:
        return [r["key"] for r in self.records]

    def by_key(self) -> dict[str, dict[str, Any]]:
        return {r["key"]: r for r in self.records}


def read_out(path: Path | str, allow_torn: bool = False) -> OutFile:
    """Every complete line of OUT, each checked to be one JSON record; no key twice."""
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    body, _, torn = data.rpartition(b"\n")
    if not allow_torn:
        assert torn == b"", f"{path} ends with a torn line: {torn[:80]!r}"
    records = []
    for number, line in enumerate(body.split(b"\n") if body else [], start=1):
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError as exc:
            raise AssertionError(f"{path}:{number} is not a JSON record: {line[:120]!r}") from exc
        assert isinstance(record, dict) and isinstance(record.get("key"), str), f"{path}:{number}"
        records.append(record)
    twice = [key for key, n in Counter(r["key"] for r in records).items() if n > 1]
    assert not twice, f"{len(twice)} keys written more than once, e.g. {twice[:3]}"
    return OutFile(records, torn)


def line_count(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return handle.read().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_for_lines(path: Path, n: int, proc: Any, timeout: float = 60.0) -> None:
    """Until OUT holds ``n`` complete records: the readiness signal of a running client."""
    wait_until(lambda: line_count(path) >= n, timeout, f"{n} lines in {path}", alive=proc)


# --- servers -----------------------------------------------------------------------------------


def vm_rss_kb(pid: int) -> int:
    """Resident memory of a live process, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def server_stats(url: str) -> dict[str, Any]:
    return json.loads(http_get(url + "/stats")[1])


def requests_seen(stats: dict[str, Any]) -> int:
    """Detect requests a server received: answered ones plus injected 503s and drops."""
    faults = stats["injected_faults"]
    return sum(stats["responses"].values()) + faults["http_503"] + faults["drop"]


# --- time and a disk, passed in ----------------------------------------------------------------


class FakeClock:
    """Virtual time for the rate limiter and the retry policy (batchtag.clock.Clock):
    ``sleep`` moves the clock on at once, plus up to ``oversleep`` seconds of
    deterministic jitter as a real event loop's timer adds, and records what was asked."""

    def __init__(self, start: float = 1000.0, oversleep: float = 0.0, seed: int = 0) -> None:
        self.now = start
        self.oversleep = oversleep
        self.slept: list[float] = []
        self._jitter = random.Random(seed)

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += max(0.0, seconds) + self._jitter.uniform(0.0, self.oversleep)
        await asyncio.sleep(0)  # still a suspension point, as the real sleep is

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FullDisk:
    """A ``sink.Writer`` for a disk that fills up: writes go through until ``records``
    complete lines plus ``extra`` bytes of the next one are on disk, as a filling disk
    gives a short write, then every write fails with ENOSPC. Pass it to
    ``run_batch(..., writer=)``."""

    def __init__(self, records: int, extra: int = 0) -> None:
        self.records = records
        self.extra = extra
        self.lines = 0
        self.full = False
        self.refused = 0
        self.extra_left = 0

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def write(self, fd: int, data: Any) -> int:
        data = bytes(data)
        if self.full:
            # The first write after the last whole record may still get ``extra`` bytes in,
            # wherever the batch boundaries fell: a torn tail does not depend on them.
            if self.extra_left > 0:
                torn = os.write(fd, data[: min(len(data), self.extra_left)])
                self.extra_left = 0
                return torn
            self.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        room = len(data)
        end = -1
        for _ in range(self.records - self.lines):
            end = data.find(b"\n", end + 1)
            if end < 0:
                break
        else:
            room = min(len(data), end + 1 + self.extra)
            self.extra_left = end + 1 + self.extra - room  # extra bytes this batch had no room for
            self.full = True
        written = os.write(fd, data[:room])
        self.lines += data[:written].count(b"\n")
        return written
