"""What superseded records cost a run, and what compaction costs: the figures behind
``sink.AUTO_SHARE``.

    .venv/bin/python -m bench.compaction [--keys 100000]

For OUT files with the same keys and a growing share of superseded records (each key
rewritten as reruns do), it measures the start-of-run checkpoint scan (``read_checkpoint``,
which every run pays) and one ``compact`` of the file, 3 times each (median), on this
machine: only the ratios to the 0-share scan in the same run mean anything.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from batchtag.pipeline.compact import compact
from batchtag.pipeline.resume import read_checkpoint
from batchtag.records import Record, Settings

SETTINGS = Settings("local", "color", "zh")
SHARES = (0.0, 0.25, 0.5, 0.67, 0.8)


def write_out(path: Path, keys: int, share: float) -> None:
    """``keys`` keys with enough earlier versions that ``share`` of the lines are superseded."""
    total = round(keys / (1 - share))
    with open(path, "wb") as handle:
        batch = []
        for line in range(total):
            record = Record(
                f"https://example.test/{line % keys:08d}.jpg",
                "url",
                "ok",
                0,
                "success",
                [{"tag_name": "猫", "tag_confidence": 90}, {"tag_name": "动物", "tag_confidence": 95}],
                1,
                {"elapsed_ms": 12, "made": "2026-12-02T18:00:00.000Z", "run": "20261202T180000Z-abcdef"},
            )
            record.settings = SETTINGS
            batch.append(record.to_line())
            if len(batch) >= 10_000:
                handle.write(b"".join(batch))
                batch = []
        handle.write(b"".join(batch))


def timed(function: Callable[[], object], repeat: int = 3) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "out.jsonl"
        rows = []
        for share in SHARES:
            write_out(path, args.keys, share)
            size = path.stat().st_size
            scan = timed(lambda: read_checkpoint(str(path), settings=SETTINGS))

            compactions = []
            for _ in range(3):
                write_out(path, args.keys, share)
                started = time.perf_counter()
                compact(str(path))
                compactions.append(time.perf_counter() - started)
            compaction = statistics.median(compactions)
            rows.append((share, size, scan, compaction))
        base = rows[0][2]
        print(f"{args.keys:,} keys; scan = read_checkpoint at the start of every run; compact = one rewrite")
        print("| superseded share | OUT size | scan | scan / compacted scan | compact | compact / scan |")
        print("|---:|---:|---:|---:|---:|---:|")
        for share, size, scan, compaction in rows:
            print(
                f"| {share:.2f} | {size / 1e6:.1f} MB | {scan:.2f} s | {scan / base:.2f} | "
                f"{compaction:.2f} s | {compaction / scan:.1f} |"
            )


if __name__ == "__main__":
    main()
