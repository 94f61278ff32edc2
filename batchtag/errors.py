"""Every error batchtag raises on purpose, in one tree, and the exit status each one means.

Each carries a ``code`` (a row of ``codes.py``) and a ``message`` that is safe to show:
messages go into records, API answers and the one stderr line of the CLI, so they never
hold a secret.

    BatchtagError (code, message)
    ├── UsageError                the run cannot start or go on: one line on stderr, exit 2
    │   ├── ConfigError           bad settings (config.py)
    │   ├── SourceError           a SOURCE argument that cannot be read (pipeline/sources.py)
    │   ├── SinkError             OUT cannot be opened, locked, written, or is not ours (pipeline/sink.py)
    │   ├── NotAResultsFile       a file given as OUT to a reader is not ours (results_file.py)
    │   ├── ExportTargetError     export's output path holds a file that is not ours (export/table.py)
    │   ├── ReportTargetError     report's path or folder holds something not ours (export/report.py)
    │   ├── SummaryError          --summary-json cannot be written (pipeline/progress.py)
    │   ├── RunStopped            not the item's failure: every request would fail alike (pipeline/client.py)
    │   │   ├── CredentialsRefused    an answer about the credentials or the account
    │   │   └── EndpointUnreachable   no answer at all, or none again within --outage-wait
    │   └── ClusterError          --cluster: the cluster cannot be used or failed (cluster/)
    │       └── SchedulerLost     the Dask scheduler went away mid-run; a rerun resumes
    ├── ItemError                 one item failed: it gets an error record, the run goes on
    │   ├── InputError            missing, unreadable, not an image; no request spent (pipeline/payload.py)
    │   └── ApiFailure            one attempt at the API failed: API code, HTTP status or
    │                             transport; retried when transient (pipeline/client.py)
    └── RequestError              server side: a request answered with an API code
        ├── ApiError              any stage of `batchtag serve` refusing a request (server/)
        └── SignatureError        an Authorization value that does not verify (signing.py)

``EXIT_STATUS`` below is the one table from errors and run outcomes to exit statuses.
"""

from __future__ import annotations

from enum import Enum

from batchtag import codes
from batchtag.interrupts import EXIT_INTERRUPTED


class BatchtagError(Exception):
    """The base: ``code`` from codes.py, ``message`` for people (no secrets)."""

    def __init__(self, code: int, message: str = "") -> None:
        self.code = code
        self.message = message or codes.message(code)
        super().__init__(self.message)


# --- the run as a whole -------------------------------------------------------------------


class UsageError(BatchtagError):
    """Settings, sources or OUT make the run impossible: nothing to retry, the user acts."""

    run_code = codes.RUN_USAGE_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(self.run_code, message)


class ConfigError(UsageError):
    """Bad settings: one clear line for the user, exit 2."""


class SourceError(UsageError):
    """A SOURCE argument that is unusable as a whole (missing, unreadable, bad header)."""


class SinkError(UsageError):
    """OUT cannot be opened, locked or written: the run stops (exit 2), what is written stays."""

    run_code = codes.RUN_OUT_ERROR


class NotAResultsFile(UsageError):
    """A file given as OUT that does not start with a batchtag record."""


class ExportTargetError(UsageError):
    """The output path holds a file that is not a batchtag export: it is left alone."""


class ReportTargetError(UsageError):
    """The report's path or its folder holds something that is not a batchtag report."""


class SummaryError(UsageError):
    """--summary-json cannot be written: one line, exit 2 (records are not affected)."""


class RunStopped(UsageError):
    """Every request would fail the same way, so the run stops (exit 2) with one line
    instead of writing an error record for each item; items in flight get no record."""


class CredentialsRefused(RunStopped):
    """The service answered with a code about the credentials or the account (codes.py
    marks them with the setting to check)."""

    run_code = codes.RUN_CREDENTIALS_REFUSED

    def __init__(self, api_code: int, message: str) -> None:
        super().__init__(
            f"the service refused the credentials (code {api_code}: {message}); {codes.describe(api_code).fix}"
        )
        self.api_code = api_code


class EndpointUnreachable(RunStopped):
    """The endpoint never answered, or went away and was not back within --outage-wait."""

    run_code = codes.RUN_ENDPOINT_UNREACHABLE


class ClusterError(UsageError):
    """The Dask cluster cannot be reached or used: one line, exit 2; OUT keeps what was written."""

    run_code = codes.RUN_CLUSTER_ERROR


class SchedulerLost(ClusterError):
    """The scheduler went away mid-run: nothing left to clean up on the cluster."""


# --- one item ------------------------------------------------------------------------------


class ItemError(BatchtagError):
    """One item failed; ``code`` and ``message`` go into its error record."""


class InputError(ItemError):
    """The item itself is bad (missing, unreadable, empty, not an image): caught before any
    request is spent."""


class ApiFailure(ItemError):
    """One attempt failed: an API error code, an HTTP status, or a transport problem."""

    def __init__(
        self, code: int, message: str, http_status: int | None = None, unreachable: bool = False
    ) -> None:
        super().__init__(code, message)
        self.http_status = http_status
        self.unreachable = unreachable  # no connection at all: says nothing about the item

    @property
    def retry_class(self) -> codes.Retry:
        return codes.retry_class(self.code, self.http_status)

    @property
    def transient(self) -> bool:
        return self.retry_class is codes.Retry.TRANSIENT

    @property
    def rate_limited(self) -> bool:
        return codes.is_rate_limit(self.code, self.http_status)


# --- the server -----------------------------------------------------------------------------


class RequestError(BatchtagError):
    """A request `batchtag serve` answers with ``code`` (HTTP 200, the API's JSON)."""


class ApiError(RequestError):
    """A request the API answers with ``code``; ``detail`` is appended to the table's message.

    Details go back to the caller, so they must never contain secrets or request bodies.
    """

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(code, api_message(code, detail))
        self.detail = detail


class SignatureError(RequestError):
    """A signature the server must refuse; ``code`` is the API's answer, ``message`` the
    detail when there is one (else the table's message)."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(code, detail)
        self.detail = detail


def api_message(code: int, detail: str = "") -> str:
    """The answer's message: the table's, then the detail."""
    base = codes.message(code)
    return f"{base}: {detail}" if detail else base


# --- exit statuses ---------------------------------------------------------------------------


class Outcome(Enum):
    """How a run that was not stopped by an error ended: what this run did, then what OUT
    holds. Which of them count as a failure is the pipeline's choice (``--fail-on``)."""

    ALL_OK = "nothing that --fail-on counts: every item this run did is ok, or nothing new to do"
    SOME_FAILED = "new errors: items that failed for the first time in this run"
    NO_ITEMS = "the sources held no items at all (an empty folder, a disk that did not mount)"
    OLD_ERRORS = (
        "no new errors, but OUT holds error records: earlier failures, tried again and failed "
        "again, or settled (redo them with --retry-errors)"
    )
    INTERRUPTED = "interrupted (Ctrl-C, SIGTERM) after writing every finished record"
    REQUEST_LIMIT = "stopped after --max-requests requests, every answer written: rerun to go on"


EXIT_STATUS: dict[Outcome | type[BaseException], int] = {
    Outcome.ALL_OK: 0,
    Outcome.SOME_FAILED: 1,
    UsageError: 2,  # also argparse's own usage errors (cli.Parser)
    BrokenPipeError: 2,  # stdout's reader left (``| head``): what was to be printed was not
    Outcome.NO_ITEMS: 3,
    Outcome.OLD_ERRORS: 4,
    Outcome.REQUEST_LIMIT: 5,
    Outcome.INTERRUPTED: EXIT_INTERRUPTED,  # 130, the shells' 128 + SIGINT
    KeyboardInterrupt: EXIT_INTERRUPTED,  # export and report, which raise on a signal
}

# --fail-on: which outcomes a pipeline counts as failures. An outcome not listed here is
# always its own status (0 is success, the rest always fail); one listed is its status only
# under these choices, and 0 otherwise. The default ``any``: a scheduler never reads success
# while OUT holds failures, and the two cases keep their own statuses (1 new, 4 old), so a
# pipeline that has accepted its dead links says ``--fail-on new`` and still hears of new ones.
FAIL_ON_CHOICES = ("none", "new", "any")
DEFAULT_FAIL_ON = "any"
FAILS_UNDER: dict[Outcome, tuple[str, ...]] = {
    Outcome.SOME_FAILED: ("new", "any"),
    Outcome.OLD_ERRORS: ("any",),
}
# What the rows for errors (not outcomes) say; an error class left out is not shown.
ERROR_ROWS: dict[type[BaseException], str] = {
    UsageError: "stopped: usage or configuration error, OUT unusable, credentials refused or the "
    "endpoint unreachable (one line on stderr)",
}


def exit_rows() -> list[tuple[int, str, str]]:
    """The exit-status table (status, when, under which --fail-on), in status order: README's
    table and ``run --help`` are both made from it."""
    rows = []
    for what, status in EXIT_STATUS.items():
        if isinstance(what, Outcome):
            when = what.value
            under = FAILS_UNDER.get(what)
            fails = ", ".join(under) if under else ("never a failure" if status == 0 else "always")
        elif what in ERROR_ROWS:
            when, fails = ERROR_ROWS[what], "always"
        else:
            continue
        rows.append((status, when, fails))
    return sorted(rows, key=lambda row: row[0])


def exit_table_markdown() -> str:
    """README's exit-status table (a test checks README holds exactly this)."""
    lines = ["| status | when | fails under `--fail-on` |", "|---:|---|---|"]
    lines += [f"| {status} | {when} | {fails} |" for status, when, fails in exit_rows()]
    return "\n".join(lines) + "\n"


def exit_status(what: Outcome | BaseException | type[BaseException]) -> int:
    """The exit status of an outcome or an error (its nearest class in the table).
    Errors not in the table are bugs: they are not given a status here."""
    if isinstance(what, Outcome):
        return EXIT_STATUS[what]
    kind = what if isinstance(what, type) else type(what)
    for cls in kind.__mro__:
        if cls in EXIT_STATUS:
            return EXIT_STATUS[cls]
    raise KeyError(f"no exit status for {kind.__name__}")


def counts_as_failure(outcome: Outcome, fail_on: str) -> bool:
    """Whether ``outcome`` keeps its status under ``--fail-on fail_on`` (else it is 0)."""
    under = FAILS_UNDER.get(outcome)
    return under is None or fail_on in under


if __name__ == "__main__":
    print(exit_table_markdown(), end="")
