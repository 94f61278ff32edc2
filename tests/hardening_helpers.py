"""Helpers shared by the tests/test_hardening_*.py files: real `batchtag serve` and
`batchtag run` subprocesses, tiny image trees, and strict checks of OUT.

Every subprocess is started through a ``Spawner`` whose ``close()`` kills what is still
running (by its own pid), and writes its output to files, never to a pipe nobody reads.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

APPID = "1000001"
SECRET_ID = "AKIDhardeningSecretId01"
SECRET_KEY = "HARDENING-secret-key-5b1e0c9d"


def write_credentials(path: Path, secret_key: str = SECRET_KEY) -> Path:
    path.write_text(
        json.dumps({"credentials": [{"appid": APPID, "secret_id": SECRET_ID, "secret_key": secret_key}]})
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(*args: Any) -> list[str]:
    return [sys.executable, "-m", "batchtag", *map(str, args)]


def run_flags(url: str, secret_key: str = SECRET_KEY) -> list[str]:
    """The `batchtag run` flags that point at a subprocess server started by ``Spawner.serve``."""
    return ["--endpoint", url, "--appid", APPID, "--secret-id", SECRET_ID, "--secret-key", secret_key]


def run_cli(*args: Any, timeout: float = 120, env: dict[str, str] | None = None, **kwargs: Any):
    """`batchtag ...` to completion; output captured as text."""
    return subprocess.run(
        command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def wait_healthy(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}")
        try:
            if http_get(f"http://127.0.0.1:{port}/healthz", timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("server did not become healthy")


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
    """Starts subprocesses with output in ``workdir``; ``close()`` kills the survivors."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Proc] = []

    def start(self, *args: Any, name: str = "proc", env: dict[str, str] | None = None, **kwargs: Any) -> Proc:
        index = len(self.started)
        out = self.workdir / f"{name}-{index}.out"
        err = self.workdir / f"{name}-{index}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            popen = subprocess.Popen(
                command(*args),
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
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
        wait_healthy(port, proc.popen)
        return proc, f"http://127.0.0.1:{port}"

    def close(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.popen.kill()
                proc.popen.wait(timeout=15)


# --- images ---------------------------------------------------------------------------------


def jpeg_bytes(size: tuple[int, int] = (16, 12), color: tuple[int, int, int] = (20, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def tiny_jpegs(root: Path, n: int, variety: int = 24) -> list[str]:
    """``n`` small JPEG files (``variety`` distinct contents); their keys, sorted."""
    root.mkdir(parents=True, exist_ok=True)
    contents = [jpeg_bytes(color=(i * 10 % 256, 200 - i * 7 % 200, 60)) for i in range(variety)]
    paths = []
    for i in range(n):
        path = root / f"img{i:06}.jpg"
        path.write_bytes(contents[i % variety])
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


# --- a disk that fills up -------------------------------------------------------------------


class FullDisk:
    """Stands in for the ``os`` module inside ``batchtag.sink`` (everything else is the real
    ``os``): writes go through until ``records`` complete lines plus ``extra`` bytes of the
    next one are on disk, as a filling disk gives a short write, then every write fails
    with ENOSPC."""

    def __init__(self, records: int, extra: int = 0) -> None:
        self.records = records
        self.extra = extra
        self.lines = 0
        self.full = False
        self.refused = 0
        self.extra_left = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

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
