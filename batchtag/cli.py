"""The command line: ``batchtag run``, ``serve``, ``sign``, ``export``, ``report`` and ``compact``, a thin
dispatcher over ``batchtag.commands`` (one module a subcommand).

Exit statuses come from one table, ``errors.EXIT_STATUS`` (README.md, "Exit status",
and ``batchtag run --help``): errors are one line on stderr, never a traceback; Ctrl-C and
SIGTERM mean 130 from start-up to exit (interrupts.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from batchtag import __version__
from batchtag.commands import EXIT_USAGE, silence_stdout
from batchtag.commands.compact import add_compact_parser, command_compact
from batchtag.commands.export import add_export_parser, command_export
from batchtag.commands.report import add_report_parser, command_report
from batchtag.commands.run import add_run_parser, command_run
from batchtag.commands.serve import add_serve_parser, command_serve
from batchtag.commands.sign import add_sign_parser, command_sign
from batchtag.errors import exit_status
from batchtag.interrupts import EXIT_INTERRUPTED, INTERRUPTS

COMMANDS = {
    "run": command_run,
    "serve": command_serve,
    "export": command_export,
    "report": command_report,
    "sign": command_sign,
    "compact": command_compact,
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as the contract says
        self.exit(EXIT_USAGE, f"batchtag: error: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="batchtag", description="Tag large image collections through the image-tag API.")
    parser.add_argument("--version", action="version", version=f"batchtag {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_run_parser(commands)
    add_serve_parser(commands)
    add_export_parser(commands)
    add_report_parser(commands)
    add_sign_parser(commands)
    add_compact_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    INTERRUPTS.install()
    try:
        args = make_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
            format="batchtag: %(levelname)s: %(message)s",
        )
        if args.command in ("export", "report"):
            INTERRUPTS.raising()  # their temp files are removed by the exception
        code = COMMANDS[args.command](args)
        sys.stdout.flush()
        sys.stderr.flush()
    except KeyboardInterrupt:
        print("batchtag: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BrokenPipeError as exc:
        silence_stdout()
        code = exit_status(exc)
    INTERRUPTS.finishing()
    if INTERRUPTS.signalled:
        # Records are flushed and the summary printed: do not wait for worker threads a
        # stuck read may hold (the interpreter would join them at exit).
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
