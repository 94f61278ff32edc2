"""Print a results file as one readable line an image: ``python -m batchtag.commands.show OUT.jsonl``."""

from __future__ import annotations

import os
import sys

from batchtag.commands import silence_stdout
from batchtag.records import Record, iter_valid_records


def describe(record: Record) -> str:
    name = os.path.relpath(record.key) if record.source == "file" else record.key
    if not record.ok:
        return f"{name}: error {record.code}: {record.message}"
    tags = ", ".join(f"{t['tag_name']} {t['tag_confidence']}" for t in record.tags)
    return f"{name}: {tags or '(no tags)'}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m batchtag.commands.show OUT.jsonl", file=sys.stderr)
        return 2
    try:
        for record in sorted(iter_valid_records(argv[0]), key=lambda r: r.key):
            print(describe(record))
        sys.stdout.flush()
    except BrokenPipeError:  # ``| head`` took what it wanted
        silence_stdout()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
