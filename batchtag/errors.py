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
    def transient(self) -> bool:
        if self.code == codes.CLIENT_HTTP_ERROR and self.http_status is not None:
            return codes.is_transient_http(self.http_status)
        return codes.is_transient(self.code)

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
    """How a run that was not stopped by an error ended."""

    ALL_OK = "every item this run did is ok, or there was nothing new to do"
    SOME_FAILED = "finished, and some of this run's items have error records"
    NO_ITEMS = "the sources held no items at all (an empty folder, a disk that did not mount)"
    INTERRUPTED = "interrupted (Ctrl-C, SIGTERM) after writing every finished record"
    REQUEST_LIMIT = "stopped after --max-requests requests, every answer written: rerun to go on"


EXIT_STATUS: dict[Outcome | type[BaseException], int] = {
    Outcome.ALL_OK: 0,
    Outcome.SOME_FAILED: 1,
    UsageError: 2,  # also argparse's own usage errors (cli.Parser)
    BrokenPipeError: 2,  # stdout's reader left (``| head``): what was to be printed was not
    Outcome.NO_ITEMS: 3,
    Outcome.REQUEST_LIMIT: 5,
    Outcome.INTERRUPTED: EXIT_INTERRUPTED,  # 130, the shells' 128 + SIGINT
    KeyboardInterrupt: EXIT_INTERRUPTED,  # export and report, which raise on a signal
}


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
