"""One module a subcommand (``run``, ``serve``, ``sign``, ``export``, ``report``, ``show``),
each with its arguments and its exit statuses; ``batchtag.cli`` only dispatches. What they
share is here: the usage exit status, one-line errors and a closed stdout."""

from __future__ import annotations

import os
import sys

from batchtag.errors import EXIT_STATUS, UsageError, exit_status

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
