"""``batchtag run``: its arguments, and a run in its own event loop that Ctrl-C and SIGTERM
cancel (records flushed, exit 130); errors are one line on stderr with the table's status."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import Field, fields
from typing import TYPE_CHECKING, Any

from batchtag.errors import Outcome, UsageError, exit_rows, exit_status
from batchtag.interrupts import INTERRUPTS

if TYPE_CHECKING:
    from batchtag.config import RunConfig
    from batchtag.pipeline.progress import Summary


def exit_status_help() -> str:
    """The exit statuses for ``run --help``, from the one table (``errors.exit_rows``)."""
    lines = ["exit status (--fail-on chooses which outcomes fail; the others exit 0):"]
    for status, when, fails in exit_rows():
        lines.append(f"  {status:<4} {when} [fails: {fails}]")
    return "\n".join(lines)


def add_run_parser(commands: Any) -> None:
    from batchtag.config import RunConfig

    p = commands.add_parser(
        "run",
        help="tag images from directories, files and manifests",
        description="Tag every image in SOURCE... into OUT (JSONL), resumably.",
        epilog=exit_status_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for setting in fields(RunConfig):
        add_setting_argument(p, setting)
    p.add_argument("--config", help="TOML file with settings (flags and environment win)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")


def add_setting_argument(parser: argparse.ArgumentParser, setting: Field[Any]) -> None:
    """The flag of a run setting, from its declaration in ``config.RunConfig``."""
    flags, spec = setting.metadata["flags"], setting.metadata
    if not flags:
        return  # a setting of the --config file only
    options = {**spec["cli"], "help": spec["help"]}
    if spec["kind"] in ("int", "float") and "action" not in options:
        options["type"] = int if spec["kind"] == "int" else float
    if options.get("action") == "store_true":
        options["default"] = None  # unset: the environment or the --config file decides
    if flags[0].startswith("-"):
        parser.add_argument(*flags, dest=setting.name, **options)
    else:
        parser.add_argument(setting.name, **options)


def run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings given on the command line (None: not given)."""
    from batchtag.config import FLAG_FIELDS

    return {name: getattr(args, name) for name in FLAG_FIELDS}


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
        if config.dry_run:
            return command_dry_run(config)
        summary = run_in_a_new_loop(config)
        print(summary.render(), file=sys.stderr)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("batchtag: interrupted", file=sys.stderr)
        return exit_status(Outcome.INTERRUPTED)
    except UsageError as exc:
        print(f"batchtag: error: {exc.message}", file=sys.stderr)
        return exit_status(exc)
    return exit_status(Outcome.INTERRUPTED) if INTERRUPTS.signalled else summary.exit_code


def command_dry_run(config: RunConfig) -> int:
    """``run --dry-run``: the counts on stderr (and --summary-json), nothing sent or written."""
    from batchtag.pipeline.dryrun import dry_run
    from batchtag.pipeline.progress import check_summary_path, write_json

    if config.summary_json:
        check_summary_path(config.summary_json)
    estimate = dry_run(config)
    print(estimate.render(), file=sys.stderr)
    if config.summary_json:
        write_json(estimate.to_dict(), config.summary_json)
    return exit_status(Outcome.ALL_OK)
