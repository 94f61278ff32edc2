"""What each record says about its run: when it was made, by which run, and how many runs
have tried a key whose failure settles; and what this run's errors mean for the exit status.

A nightly table needs to tell which night tagged a row (``made``, UTC ISO 8601, and ``run``,
the run's id); a dead link must stop costing a request every night, so an error record
carries ``run_attempts``, carried forward from the key's previous record by resume
(``Checkpoint.settling_keys``/``settling_runs``) and compared with ``--max-attempts``
there. The exit status separates errors that are new in this run from old ones that
failed again (``errors.Outcome``): the ledger counts both as the writer writes.
"""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass, field

import numpy as np

from batchtag.keyset import KeySet, fingerprint
from batchtag.pipeline.resume import Checkpoint
from batchtag.records import RUN_ATTEMPTS, Record

FAILURES_LISTED = 20  # failing keys named in --summary-json, at most


def new_run_id() -> str:
    """Sortable by start time, unique enough for one archive: ``20261202T183001Z-3f9a1c``."""
    started = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{started}-{secrets.token_hex(3)}"


def utc_now() -> str:
    """When a record was made: UTC, ISO 8601, to the millisecond."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class ErrorCounts:
    """This run's error records, by what the key's previous record was."""

    new: int = 0  # failed for the first time (no record, an ok one, or a changed file)
    again: int = 0  # the previous record was an error too (or --retry-errors removed it)
    redone: int = 0  # keys whose previous record was an error, rewritten by this run (ok or not)
    failures: list[dict[str, object]] = field(default_factory=list)  # the first FAILURES_LISTED


class Ledger:
    """Stamps records before the writer writes them; one a run."""

    def __init__(self, checkpoint: Checkpoint, run_id: str | None = None) -> None:
        self.run_id = run_id or new_run_id()
        self._checkpoint = checkpoint
        self.errors = ErrorCounts()

    def stamp(self, batch: list[Record]) -> None:
        """Set ``made``, ``run`` and, on errors, ``run_attempts``; count the errors."""
        made = utc_now()
        fps = np.fromiter((fingerprint(r.key) for r in batch), dtype=np.uint64, count=len(batch))
        in_out = self.among(self._checkpoint.errors, fps)  # error records OUT holds
        retried = self.among(self._checkpoint.retried_errors, fps)  # removed by --retry-errors
        before = self.runs_before(fps)
        for index, record in enumerate(batch):
            record.extra["made"] = made
            record.extra["run"] = self.run_id
            self.errors.redone += bool(in_out[index])
            if record.ok:
                record.extra.pop(RUN_ATTEMPTS, None)
                continue
            record.extra[RUN_ATTEMPTS] = int(before[index]) + 1
            if in_out[index] or retried[index]:
                self.errors.again += 1
            else:
                self.errors.new += 1
            if len(self.errors.failures) < FAILURES_LISTED:
                self.errors.failures.append(
                    {"key": record.key, "code": record.code, "message": record.message}
                )

    @staticmethod
    def among(keys: KeySet, fps: np.ndarray) -> np.ndarray:
        return keys.contains_many(fps) if len(keys) else np.zeros(len(fps), dtype=bool)

    def runs_before(self, fps: np.ndarray) -> np.ndarray:
        """Runs that tried each key before this one, when its last record settles (else 0)."""
        keys, runs = self._checkpoint.settling_keys, self._checkpoint.settling_runs
        if not len(keys):
            return np.zeros(len(fps), dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, fps), len(keys) - 1)
        return np.where(keys[at] == fps, runs[at].astype(np.int64), 0)
