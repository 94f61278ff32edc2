"""``python -m bench.quality [--out FILE] [--limit N]``: recall and precision of the embedded
model tagger on the evaluation set, per configuration and half; prints the markdown report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.quality.dataset import HALVES, load
from bench.quality.evaluate import report, run_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--limit", type=int, default=0, help="only the first N photos of each half (a smoke run)"
    )
    args = parser.parse_args(argv)
    photos, vocabulary = load()
    if args.limit:
        photos = [p for half in HALVES for p in [q for q in photos if q.half == half][: args.limit]]
    started = time.monotonic()
    results, default = run_all(photos, vocabulary)
    text = report(results, photos, default)
    print(text)
    print(f"({len(results)} configurations, {time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
