"""Print a results file as one readable line an image: ``python -m batchtag.show OUT.jsonl``."""

from __future__ import annotations

import json
import os
import sys


def describe(record: dict) -> str:
    name = os.path.relpath(record["key"]) if record.get("source") == "file" else record["key"]
    if record.get("status") != "ok":
        return f"{name}: error {record.get('code')}: {record.get('message')}"
    tags = ", ".join(f"{t['tag_name']} {t['tag_confidence']}" for t in record.get("tags", []))
    return f"{name}: {tags or '(no tags)'}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m batchtag.show OUT.jsonl", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    for record in sorted(records, key=lambda r: r["key"]):
        print(describe(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
