"""Send SIGTERM or SIGINT at random moments to many `batchtag run`s and count how they end.

A measurement for interrupts.py (issue 20), not a test: run it with the cores busy
(``yes > /dev/null &`` twice) to see the moments a loaded machine makes likely. Each run
tags the same small folder with the embedded colour tagger; the moment is drawn from
zero to 1.2 times a whole run, measured from the spawn, so it covers the interpreter's
start-up, the imports, the run, the summary and the exit. Prints one line per run and
the counts: exit status, tracebacks, and whether the handler was installed when the
signal went (SigCgt in /proc; "not-handled" is the interpreter's start-up before it, or
the exit's last clean-up after it, where the signals are ignored).

    python scripts/signal_storm.py --runs 24 [--seed 1] [--max-delay 3]  # 3: start-up only
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

RUN_ARGS = ["--tagger", "color", "--no-progress"]


def make_photos(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (32, 24), (i * 7 % 256, 90, 200)).save(folder / f"{i:03}.jpg")


def start(photos: Path, out: Path, err: Path) -> subprocess.Popen:
    with open(err, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "batchtag", "run", str(photos), "-o", str(out), *RUN_ARGS],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "BATCHTAG_ENDPOINT": ""},
        )


def handler_installed(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=24)
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-delay", type=float, help="draw moments up to this (s); default 1.2 whole runs")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_photos(work / "photos", args.photos)
        for attempt in ("warm-up", "timed"):  # the first run compiles bytecode, a slow start
            started = time.monotonic()
            proc = start(work / "photos", work / f"{attempt}.jsonl", work / f"{attempt}.err")
            assert proc.wait() == 0, (work / f"{attempt}.err").read_text()
        whole = time.monotonic() - started
        print(f"a whole run: {whole:.2f} s", flush=True)
        counts: collections.Counter[str] = collections.Counter()
        for number in range(args.runs):
            signum = rng.choice([signal.SIGTERM, signal.SIGINT])
            delay = rng.uniform(0, args.max_delay or whole * 1.2)
            err = work / f"{number}.err"
            proc = start(work / "photos", work / f"{number}.jsonl", err)
            time.sleep(delay)
            alive = proc.poll() is None
            installed = handler_installed(proc.pid)  # False: start-up, or the exit's clean-up
            if alive:
                proc.send_signal(signum)
            code = proc.wait()
            text = err.read_text(errors="replace")
            traceback = "Traceback" in text or "Exception ignored" in text
            phase = "exited" if not alive else ("handled" if installed else "not-handled")
            counts[f"exit {code}"] += 1
            counts[f"exit {code} ({phase})"] += 1
            counts["traceback"] += traceback
            print(
                f"{number:3} {signal.Signals(signum).name:7} at {delay:5.2f} s  {phase:14} exit {code:4}"
                f"{'  TRACEBACK' if traceback else ''}",
                flush=True,
            )
            if traceback:
                print("    " + text.strip().replace("\n", "\n    ")[-600:], flush=True)
        print("counts:", dict(sorted(counts.items())))


if __name__ == "__main__":
    main()
