"""``batchtag compact OUT [--drop-missing]``: the command line of ``pipeline/compact.py``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from batchtag.errors import Outcome, UsageError, exit_status


def add_compact_parser(commands: Any) -> None:
    p = commands.add_parser(
        "compact",
        help="rewrite OUT with one record per key (atomically)",
        description="Rewrite OUT keeping each key's valid record only: records superseded by a "
        "later one (changed files, --retag, errors done again) go; with --drop-missing so do the "
        "records of files that no longer exist (an archive that moved). Atomic: OUT is the old "
        "file or the new one at every instant; a run on OUT at the same time is refused.",
    )
    p.add_argument("out_file", metavar="OUT.jsonl", help="results of batchtag run")
    p.add_argument(
        "--drop-missing",
        action="store_true",
        help="also drop the records of files that are no longer there (urls are kept)",
    )


def command_compact(args: argparse.Namespace) -> int:
    from batchtag.pipeline.compact import compact

    try:
        counts = compact(args.out_file, args.drop_missing)
    except UsageError as exc:
        return refused(exc)
    missing = f", {counts.missing:,} of missing files" if args.drop_missing else ""
    print(
        f"batchtag: compacted {args.out_file}: {counts.kept:,} records kept, {counts.superseded:,} "
        f"superseded{missing} removed",
        file=sys.stderr,
    )
    return exit_status(Outcome.ALL_OK)


def refused(exc: UsageError) -> int:
    print(f"batchtag: error: {exc.message}", file=sys.stderr)
    return exit_status(exc)
