"""``batchtag export``: argument parsing and exit statuses.

Exit statuses come from ``errors.EXIT_STATUS``: ALL_OK when done; SOME_FAILED when some
sidecars were refused or could not be written; a UsageError (OUT missing or not a results
file, an output path that is not ours) is one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from batchtag.commands import add_min_confidence, check_min_confidence, known_error
from batchtag.errors import Outcome, UsageError, exit_status

FORMATS = ("xmp", "csv", "parquet")


def add_export_parser(commands: Any) -> None:
    from batchtag.export import NAMINGS

    p = commands.add_parser(
        "export",
        help="write the tags as XMP sidecars, CSV or Parquet",
        description="Export OUT's tags: XMP sidecars beside the images, or one CSV/Parquet table.",
    )
    p.add_argument("out_file", metavar="OUT.jsonl", help="results of batchtag run")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument(
        "-o", "--output", metavar="PATH", help="the table to write (default: OUT with .csv/.parquet)"
    )
    add_min_confidence(p)
    p.add_argument(
        "--xmp-naming",
        choices=NAMINGS,
        default="default",
        help="sidecar names: photo.jpg.xmp (default: digiKam, darktable) or photo.xmp (lightroom)",
    )
    p.add_argument(
        "--csv-raw",
        action="store_true",
        help="csv: write cells exactly as OUT holds them; by default a text cell starting with "
        "= + - @ tab or CR gets a leading ' so a spreadsheet shows it instead of running it",
    )
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None)


def default_table_path(out_file: str, fmt: str) -> str:
    return os.path.splitext(out_file)[0] + "." + fmt


def command_export(args: argparse.Namespace) -> int:
    from batchtag.export.common import progress_bar, read_records

    try:
        check_min_confidence(args.min_confidence)
        if args.format == "xmp" and args.output:
            raise UsageError("xmp sidecars go beside the images; -o is for csv and parquet")
        if args.csv_raw and args.format != "csv":
            raise UsageError("--csv-raw is for --format csv")
        with progress_bar(f"export {args.format}", args.progress) as bar:
            records = read_records(args.out_file, bar)
            if args.format == "xmp":
                return export_xmp(records, args)
            return export_table(records, args)
    except Exception as exc:
        return known_error(exc)


def export_xmp(records: Any, args: argparse.Namespace) -> int:
    from batchtag.export.xmp import export_xmp as write_sidecars

    counts = write_sidecars(records, args.min_confidence, args.xmp_naming)
    print(
        f"batchtag: xmp sidecars: {counts.created} created, {counts.updated} updated, "
        f"{counts.unchanged} unchanged; {counts.refused} refused, {counts.failed} failed; "
        f"skipped: {counts.skipped_url} urls, {counts.untagged} untagged or errors, "
        f"{counts.missing} images missing",
        file=sys.stderr,
    )
    return exit_status(Outcome.SOME_FAILED if counts.problems else Outcome.ALL_OK)


def export_table(records: Any, args: argparse.Namespace) -> int:
    from batchtag.export.table import write_csv, write_parquet

    path = args.output or default_table_path(args.out_file, args.format)
    if args.format == "csv":
        counts = write_csv(records, path, args.min_confidence, raw=args.csv_raw)
    else:
        counts = write_parquet(records, path, args.min_confidence)
    print(f"batchtag: {counts.rows} rows written to {counts.path}", file=sys.stderr)
    return exit_status(Outcome.ALL_OK)
