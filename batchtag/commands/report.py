"""``batchtag report``: an HTML page of OUT; its arguments and exit statuses (a UsageError
is one line on stderr, as for ``export``)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from batchtag.commands import add_min_confidence, check_min_confidence, known_error
from batchtag.errors import Outcome, exit_status


def add_report_parser(commands: Any) -> None:
    p = commands.add_parser(
        "report",
        help="write an HTML page to look at the results",
        description="An HTML report of OUT that opens from disk: summary, top tags, errors, thumbnails.",
    )
    p.add_argument("out_file", metavar="OUT.jsonl", help="results of batchtag run")
    p.add_argument("-o", "--output", required=True, metavar="report.html")
    add_min_confidence(p)
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None)


def command_report(args: argparse.Namespace) -> int:
    from batchtag.export.common import at_confidence, progress_bar, read_records
    from batchtag.export.report import write_report

    try:
        check_min_confidence(args.min_confidence)
        with progress_bar("report", args.progress) as bar:
            records = at_confidence(read_records(args.out_file, bar), args.min_confidence)
            result = write_report(records, args.output, os.path.basename(args.out_file), bar)
    except Exception as exc:
        return known_error(exc)
    print(
        f"batchtag: report of {result.items} items written to {result.path} "
        f"({result.thumbnails_made} thumbnails made, {result.thumbnails_reused} reused)",
        file=sys.stderr,
    )
    return exit_status(Outcome.ALL_OK)
