"""The command line: ``batchtag run``, ``serve``, ``export`` and ``report``, a thin layer over the API.

Exit statuses come from one table, ``errors.EXIT_STATUS`` (README.md, "Exit status",
and ``batchtag run --help``): errors are one line on stderr, never a traceback; Ctrl-C and
SIGTERM mean 130 from start-up to exit (interrupts.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from batchtag import __version__
from batchtag.errors import EXIT_STATUS, Outcome, UsageError, exit_status
from batchtag.export.commands import add_export_parser, add_report_parser, command_export, command_report
from batchtag.interrupts import EXIT_INTERRUPTED, INTERRUPTS
from batchtag.sign_command import add_sign_parser, command_sign
from batchtag.taggers import DEFAULT_MIN_CONFIDENCE, DEFAULT_STAGES, LANGS, STAGES, TAGGERS

if TYPE_CHECKING:
    from batchtag.config import RunConfig
    from batchtag.progress import Summary

EXIT_USAGE = EXIT_STATUS[UsageError]


def exit_status_help() -> str:
    """The exit statuses for ``run --help``, from the one table."""
    lines = ["exit status:"]
    for what, status in sorted(EXIT_STATUS.items(), key=lambda row: row[1]):
        if isinstance(what, Outcome):
            lines.append(f"  {status:<4} {what.value}")
        elif what is UsageError:
            lines.append(
                f"  {status:<4} usage or configuration error, OUT unusable, credentials refused or "
                "the endpoint unreachable: one line on stderr"
            )
    return "\n".join(lines)


log = logging.getLogger("batchtag")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as the contract says
        self.exit(EXIT_USAGE, f"batchtag: error: {message} (see batchtag {self.prog.split()[-1]} --help)\n")


def add_run_parser(commands: Any) -> None:
    p = commands.add_parser(
        "run",
        help="tag images from directories, files and manifests",
        description="Tag every image in SOURCE... into OUT (JSONL), resumably.",
        epilog=exit_status_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="a directory, an image, a .txt/.csv/.jsonl manifest, or - for stdin",
    )
    p.add_argument("-o", "--out", required=True, help="results JSONL; also the resume checkpoint")
    p.add_argument("--config", help="TOML file with settings (flags and environment win)")
    p.add_argument("--endpoint", help="API base URL, or 'local' (default) for the embedded tagger")
    p.add_argument("--appid", help="env BATCHTAG_APPID")
    p.add_argument("--secret-id", help="env BATCHTAG_SECRET_ID")
    p.add_argument(
        "--secret-key",
        help="visible to other users in `ps`: prefer env BATCHTAG_SECRET_KEY or --secret-key-file",
    )
    p.add_argument(
        "--secret-key-file",
        metavar="FILE",
        help="read the secret key from FILE, which only its owner may read (chmod 600); "
        "env BATCHTAG_SECRET_KEY_FILE",
    )
    p.add_argument("--bucket", help="env BATCHTAG_BUCKET")
    p.add_argument("--concurrency", type=int, help="requests in flight (default 16)")
    p.add_argument("--qps", type=float, help="requests started per second, at most (default: no limit)")
    p.add_argument("--retries", type=int, help="extra attempts for transient failures (default 5)")
    p.add_argument("--timeout", type=float, help="seconds per request (default 30)")
    p.add_argument(
        "--outage-wait",
        type=float,
        metavar="S",
        help="an endpoint that answered and then went away is probed this long before the "
        "run stops with exit 2 (default 300); one that never answered stops it at once",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const=False,
        help="no progress bar (also automatic when stderr is not a terminal)",
    )
    p.add_argument(
        "--summary-json", metavar="PATH", help="also write the end-of-run summary as JSON here ('-': stdout)"
    )
    p.add_argument(
        "--retry-errors",
        action="store_true",
        default=None,
        help="do again the items whose record in OUT is an error",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="leave out files and folders whose name or path under the SOURCE matches (repeatable)",
    )
    p.add_argument(
        "--include-hidden",
        action="store_true",
        default=None,
        help="also walk hidden files and folders and NAS/desktop thumbnail folders (@eaDir, ...)",
    )
    p.add_argument(
        "--retag",
        action="store_true",
        default=None,
        help="redo, into the same OUT, items whose records were made with another endpoint, tagger or lang",
    )
    p.add_argument("--tagger", choices=TAGGERS, help="embedded tagger (local endpoint only)")
    p.add_argument("--lang", choices=LANGS, help="tag language of the embedded tagger (default zh)")
    p.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run on Dask: local:N (N worker processes here) or a scheduler address tcp://HOST:PORT",
    )
    p.add_argument(
        "--no-faces",
        dest="faces",
        action="store_const",
        const=False,
        help="embedded model tagger without its face stages (local endpoint only)",
    )
    add_stage_options(p, default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="log more")


def add_stage_options(p: argparse.ArgumentParser, default: bool | None) -> None:
    """``--stages`` and ``--float-classifier`` of run (embedded only) and serve."""
    p.add_argument(
        "--stages",
        metavar="LIST",
        help="model tagger stages, comma-separated, from "
        + ",".join(STAGES)
        + " (default: "
        + ",".join(s for s in STAGES if s in DEFAULT_STAGES)
        + "; blazeface is the "
        "face stage of earlier versions, kept for comparison)",
    )
    p.add_argument(
        "--float-classifier",
        action="store_const",
        const=True,
        default=default,
        help="model tagger: the unquantized classifier (slower, for comparing; default: INT8)",
    )


def add_serve_parser(commands: Any) -> None:
    p = commands.add_parser(
        "serve",
        help="serve the image-tag API locally with a real model",
        description="Serve POST /v1/detection/imagetag_detect and GET /healthz.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--tagger", choices=TAGGERS, default="model")
    p.add_argument("--lang", choices=LANGS, default="zh")
    p.add_argument(
        "--no-faces",
        dest="faces",
        action="store_false",
        help="model tagger without its face stages (people come from the object detector's boxes only)",
    )
    add_stage_options(p, default=False)
    p.add_argument(
        "--min-confidence",
        type=int,
        default=DEFAULT_MIN_CONFIDENCE,
        metavar="N",
        help="model tagger: leave tags below N (0-100) out of the answers (default: %(default)s, "
        "set on an evaluation set's tuning half; 0 answers every tag)",
    )
    p.add_argument(
        "--credentials",
        metavar="FILE",
        help="JSON or TOML with a 'credentials' list of {appid, secret_id, secret_key[, bucket]} "
        "(an entry with a bucket accepts only requests signed for and naming that bucket); "
        "default: one entry from BATCHTAG_APPID/BATCHTAG_SECRET_ID/BATCHTAG_SECRET_KEY",
    )
    p.add_argument("--qps-limit", type=float, help="each appid's quota; requests over it get code 15")
    p.add_argument("--inject-latency-ms", type=float, default=0.0)
    p.add_argument("--inject-latency-jitter-ms", type=float, default=0.0)
    p.add_argument("--inject-error-rate", type=float, default=0.0)
    p.add_argument("--allow-private-urls", action="store_true")
    add_serve_limits(p)
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log more, and one line per request (no secrets)"
    )


def add_serve_limits(p: argparse.ArgumentParser) -> None:
    """How long the server waits for slow clients, and how long a signature may live."""
    from batchtag.server import config as serve_defaults

    p.add_argument(
        "--idle-timeout",
        type=positive_float,
        default=serve_defaults.DEFAULT_IDLE_TIMEOUT_S,
        metavar="SECONDS",
        help="close a connection that sends no complete request head for this long: idle keep-alive "
        "connections and half-sent heads alike (default %(default)g)",
    )
    p.add_argument(
        "--body-timeout",
        type=positive_float,
        default=serve_defaults.DEFAULT_BODY_TIMEOUT_S,
        metavar="SECONDS",
        help="answer HTTP 408 and close when a request's body has not fully arrived this long after "
        "its head (default %(default)g)",
    )
    p.add_argument(
        "--max-signature-ttl",
        type=positive_int,
        default=serve_defaults.DEFAULT_MAX_SIGNATURE_LIFETIME_S,
        metavar="SECONDS",
        help="refuse (code 9) signatures valid for longer than this (default %(default)d, one day)",
    )


def positive_float(text: str) -> float:
    return _positive(float, text)


def positive_int(text: str) -> int:
    return _positive(int, text)


def _positive(kind: Callable[[str], Any], text: str) -> Any:
    """A number of seconds that is more than zero (zero would refuse or cut off every request)."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="batchtag", description="Tag large image collections through the image-tag API.")
    parser.add_argument("--version", action="version", version=f"batchtag {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_run_parser(commands)
    add_serve_parser(commands)
    add_export_parser(commands)
    add_report_parser(commands)
    add_sign_parser(commands)
    return parser


def run_flags(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "sources",
        "out",
        "endpoint",
        "appid",
        "secret_id",
        "secret_key",
        "secret_key_file",
        "bucket",
        "concurrency",
        "qps",
        "retries",
        "timeout",
        "outage_wait",
        "progress",
        "summary_json",
        "retry_errors",
        "tagger",
        "lang",
        "exclude",
        "include_hidden",
        "retag",
        "cluster",
        "faces",
        "stages",
        "float_classifier",
    )
    return {name: getattr(args, name) for name in names}


async def run_until_signalled(config: RunConfig) -> Summary:
    """Ctrl-C and SIGTERM cancel the run, which flushes finished records and stops."""
    from batchtag.pipeline import run_batch

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    INTERRUPTS.running(lambda: loop.call_soon_threadsafe(task.cancel))
    try:
        return await run_batch(config)
    finally:
        INTERRUPTS.running(None)


def run_in_a_new_loop(config: RunConfig) -> Summary:
    """``asyncio.run`` without its last step when interrupted: it would wait for worker
    threads that may be stuck in a read (the exit is bounded in interrupts.py instead)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(run_until_signalled(config))
    finally:
        try:
            if not INTERRUPTS.signalled:
                loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def command_run(args: argparse.Namespace) -> int:
    # Imported here, after the signal handlers: numpy and aiohttp take a while to load.
    try:
        from batchtag.config import build_config

        config = build_config(run_flags(args), args.config)
        summary = run_in_a_new_loop(config)
        print(summary.render(), file=sys.stderr)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("batchtag: interrupted", file=sys.stderr)
        return exit_status(Outcome.INTERRUPTED)
    except UsageError as exc:
        print(f"batchtag: error: {exc.message}", file=sys.stderr)
        return exit_status(exc)
    return exit_status(Outcome.INTERRUPTED) if INTERRUPTS.signalled else summary.exit_code


def command_serve(args: argparse.Namespace) -> int:
    from batchtag.server import ServeConfig, load_credentials_file, serve_forever
    from batchtag.signing import Credentials

    try:
        if args.credentials:
            credentials = load_credentials_file(args.credentials)
        else:
            env = [os.environ.get(f"BATCHTAG_{n}", "") for n in ("APPID", "SECRET_ID", "SECRET_KEY")]
            if not all(env):
                raise ValueError(
                    "give --credentials FILE, or set BATCHTAG_APPID, BATCHTAG_SECRET_ID "
                    "and BATCHTAG_SECRET_KEY"
                )
            credentials = [Credentials(*env)]
        config = ServeConfig(
            host=args.host,
            port=args.port,
            tagger=args.tagger,
            lang=args.lang,
            faces=args.faces,
            min_confidence=args.min_confidence,
            stages=args.stages,
            float_classifier=args.float_classifier,
            credentials=credentials,
            qps_limit=args.qps_limit,
            inject_latency_ms=args.inject_latency_ms,
            inject_latency_jitter_ms=args.inject_latency_jitter_ms,
            inject_error_rate=args.inject_error_rate,
            allow_private_urls=args.allow_private_urls,
            access_log=args.verbose,
            idle_timeout_s=args.idle_timeout,
            body_timeout_s=args.body_timeout,
            max_signature_lifetime_s=args.max_signature_ttl,
        )
        serve_forever(config)
    except (ValueError, OSError) as exc:
        print(f"batchtag: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return exit_status(Outcome.ALL_OK)


def silence_stdout() -> None:
    """The reader of our stdout left (``| head``): stop quietly, as ``cat`` does, instead of
    a traceback. Python flushes stdout again at exit, so it is pointed at /dev/null."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    INTERRUPTS.install()
    try:
        args = make_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
            format="batchtag: %(levelname)s: %(message)s",
        )
        commands = {
            "run": command_run,
            "export": command_export,
            "report": command_report,
            "sign": command_sign,
        }
        code = commands.get(args.command, command_serve)(args)
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
