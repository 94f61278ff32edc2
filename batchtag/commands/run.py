"""``batchtag run``: its arguments, and a run in its own event loop that Ctrl-C and SIGTERM
cancel (records flushed, exit 130); errors are one line on stderr with the table's status."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

from batchtag.errors import EXIT_STATUS, Outcome, UsageError, exit_status
from batchtag.interrupts import INTERRUPTS
from batchtag.taggers import LANGS, TAGGERS

if TYPE_CHECKING:
    from batchtag.config import RunConfig
    from batchtag.pipeline.progress import Summary


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
        help="embedded model tagger without its face detector (local endpoint only)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log more")


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
    )
    return {name: getattr(args, name) for name in names}


async def run_until_signalled(config: RunConfig) -> Summary:
    """Ctrl-C and SIGTERM cancel the run, which flushes finished records and stops."""
    from batchtag.pipeline.batch import run_batch

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
