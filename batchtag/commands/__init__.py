"""One module a subcommand (``run``, ``serve``, ``sign``, ``export``, ``report``, ``compact``, ``show``),
each with its arguments and its exit statuses; ``batchtag.cli`` only dispatches. What they
share is here: the usage exit status, one-line errors and a closed stdout."""

from __future__ import annotations

import argparse
import os
import sys

from batchtag.errors import EXIT_STATUS, UsageError, exit_status
from batchtag.taggers.base import DEFAULT_MIN_CONFIDENCE

EXIT_USAGE = EXIT_STATUS[UsageError]


def silence_stdout() -> None:
    """The reader of our stdout left (``| head``): stop quietly, as ``cat`` does, instead of
    a traceback. Python flushes stdout again at exit, so it is pointed at /dev/null."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def known_error(exc: Exception) -> int:
    """What a user can cause (a UsageError, or an OUT or output that cannot be opened)
    is one line on stderr and the table's status; anything else is a bug and propagates."""

    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        exc = UsageError(f"{where}{exc.strerror or exc}")
    if not isinstance(exc, UsageError):
        raise exc
    print(f"batchtag: error: {exc.message}", file=sys.stderr)
    return exit_status(exc)


def add_min_confidence(p: argparse.ArgumentParser) -> None:
    """``--min-confidence`` of export and report: the tagger's own default threshold, so
    sidecars and reports show what the API answers."""
    p.add_argument(
        "--min-confidence",
        type=int,
        default=DEFAULT_MIN_CONFIDENCE,
        metavar="N",
        help="leave out tags below N (0-100; default: %(default)s, the threshold batchtag serve and "
        "the embedded model answer with; 0 shows every tag in OUT)",
    )


def check_min_confidence(value: int) -> None:
    if not 0 <= value <= 100:
        raise UsageError("--min-confidence must be between 0 and 100")
