"""Progress while a run goes (a tqdm bar) and the summary at its end."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, TextIO

from batchtag import codes
from batchtag.errors import DEFAULT_FAIL_ON, Outcome, SummaryError, counts_as_failure, exit_status
from batchtag.pipeline.excludes import LeftOut
from batchtag.pipeline.ledger import FAILURES_LISTED, ErrorCounts
from batchtag.pipeline.resume import Checkpoint, Skipped
from batchtag.records import Record


def check_summary_path(path: str) -> None:
    """Refuse an unusable --summary-json before any work is done (and again, for real, at
    the end: see ``Summary.write_json``)."""
    if path == "-":
        return
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SummaryError(f"--summary-json {path}: is a directory")
    if not os.path.isdir(directory):
        raise SummaryError(f"--summary-json {path}: its folder does not exist")
    if not os.access(path if os.path.exists(path) else directory, os.W_OK):
        raise SummaryError(f"--summary-json {path}: permission denied")


@dataclass
class Summary:
    out: str = ""
    done: int = 0  # records written by this run
    ok: int = 0
    errors: int = 0
    by_code: Counter[int] = field(default_factory=Counter)
    attempts: int = 0  # requests sent, retries included
    resized: int = 0
    found: int = 0  # items the sources gave, done before or not
    skipped_done: int = 0  # already in OUT from an earlier run
    previous_errors: int = 0  # error records from earlier runs that OUT still holds
    duplicates: int = 0  # repeated keys in the sources, done once
    broken_lines: int = 0  # lines in OUT that are not complete records (their items redone)
    warnings: int = 0  # skipped symlink loops and the like
    changed: int = 0  # files whose size or mtime differ from their record: done again
    retagged: int = 0  # items whose record was made with other settings (--retag)
    reused: int = 0  # records copied from identical bytes already tagged (no request)
    converted: int = 0  # HEIC/WebP/TIFF/RAW sent as JPEG
    uprighted: int = 0  # turned upright by their EXIF orientation before sending
    left_out: LeftOut = field(default_factory=LeftOut)  # what the walk did not take
    wall_s: float = 0.0
    interrupted: bool = False
    limit_reached: bool = False  # --max-requests spent: stopped cleanly, resumable
    endpoints: dict[str, int] = field(default_factory=dict)  # items each endpoint answered (several)
    workers: Counter[str] = field(default_factory=Counter)  # records per cluster worker (--cluster)
    run_id: str = ""  # also in each record this run wrote (``run``)
    new_errors: int = 0  # of ``errors``: keys that failed for the first time
    errors_again: int = 0  # of ``errors``: keys whose previous record was an error too
    settled_errors: int = 0  # failures that settle, tried in --max-attempts runs: not tried again
    open_errors: int = 0  # error records OUT holds after this run (one a key)
    failures: list[dict[str, Any]] = field(default_factory=list)  # the first failing keys (ledger)
    fail_on: str = DEFAULT_FAIL_ON
    compacted: int = 0  # superseded records removed from OUT before the run (compact.py)

    def count(self, record: Record) -> None:
        self.done += 1
        self.attempts += record.attempts
        self.by_code[record.code] += 1
        if record.ok:
            self.ok += 1
        else:
            self.errors += 1
        if "resized" in record.extra:
            self.resized += 1
        if "reused" in record.extra:
            self.reused += 1
        if "converted" in record.extra:
            self.converted += 1
        if "uprighted" in record.extra:
            self.uprighted += 1

    def add_errors(self, errors: ErrorCounts, checkpoint: Checkpoint) -> None:
        """This run's errors set against what OUT held before it (``ledger``)."""
        self.new_errors, self.errors_again = errors.new, errors.again
        self.failures = errors.failures
        self.settled_errors = checkpoint.settled_errors
        self.open_errors = checkpoint.error_records - errors.redone + self.errors

    def left_out_lines(self) -> list[str]:
        """Files the walk left out, by reason, each with its commonest extensions."""
        lines = []
        for reason, n in sorted(self.left_out.by_reason().items(), key=lambda kv: -kv[1]):
            extensions = sorted(
                ((ext, k) for (why, ext), k in self.left_out.files.items() if why == reason),
                key=lambda kv: -kv[1],
            )
            shown = ", ".join(f"{ext} {k:,}" for ext, k in extensions[:6])
            more = ", ..." if len(extensions) > 6 else ""
            lines.append(f"  left out   {n:>10,}  {reason}: {shown}{more}")
        for reason, n in sorted(self.left_out.folders.items()):
            lines.append(f"  left out   {n:>10,}  folders, {reason} (not walked)")
        return lines

    def skip(self, skipped: Skipped) -> None:
        """Count what the resume filter passed over (called on the event loop)."""
        self.found += skipped.done + skipped.duplicates
        self.skipped_done += skipped.done
        self.duplicates += skipped.duplicates
        self.changed += skipped.changed
        self.retagged += skipped.retagged

    @property
    def items_per_s(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def outcome(self) -> Outcome:
        """What this run did, then what OUT holds, as ``--fail-on`` counts them
        (``errors.FAILS_UNDER``): new errors before old ones."""
        if self.interrupted:
            return Outcome.INTERRUPTED
        if self.limit_reached:
            return Outcome.REQUEST_LIMIT
        if self.found == 0:
            return Outcome.NO_ITEMS
        happened = (
            (Outcome.SOME_FAILED, self.new_errors > 0),
            (Outcome.OLD_ERRORS, self.open_errors > 0),
        )
        for outcome, true in happened:
            if true and counts_as_failure(outcome, self.fail_on):
                return outcome
        return Outcome.ALL_OK

    @property
    def exit_code(self) -> int:
        return exit_status(self.outcome)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["by_code"] = {str(code): n for code, n in sorted(self.by_code.items())}
        data["left_out"] = self.left_out.to_dict()
        data["failures_listed_at_most"] = FAILURES_LISTED
        data["workers"] = dict(sorted(self.workers.items()))
        if not self.workers:
            del data["workers"]
        if not self.endpoints:
            del data["endpoints"]
        data["items_per_s"] = round(self.items_per_s, 2)
        data["requests_per_s"] = round(self.attempts / self.wall_s, 2) if self.wall_s > 0 else 0.0
        data["exit_code"] = self.exit_code
        return data

    def write_json(self, path: str) -> None:
        write_json(self.to_dict(), path)

    def render(self) -> str:
        """The one-screen end-of-run report."""
        lines = [
            f"batchtag: {self.done:,} items in {self.wall_s:.1f} s "
            f"({self.items_per_s:,.1f} items/s, {self.attempts:,} requests)"
            + ("  [interrupted]" if self.interrupted else "")
            + ("  [stopped at --max-requests: rerun to go on]" if self.limit_reached else ""),
            f"  ok         {self.ok:>10,}",
            f"  error      {self.errors:>10,}",
        ]
        failures = {code: n for code, n in self.by_code.items() if code != codes.OK}
        for code, n in sorted(failures.items(), key=lambda kv: -kv[1])[:10]:
            lines.append(f"    code {code:>6}  {n:>8,}  {codes.message(code)}")
        if self.failures:  # the whole message once: it may say what to do
            lines.append(f"    first: {self.failures[0]['key']}: {self.failures[0]['message']}")
        if self.skipped_done:
            lines.append(f"  skipped    {self.skipped_done:>10,}  already in OUT")
        if self.errors_again:
            lines.append(f"    again    {self.errors_again:>10,}  failed before too (not new)")
        if self.previous_errors:
            lines.append(
                f"  old errors {self.previous_errors:>10,}  error records from earlier runs in OUT "
                "(redo them with --retry-errors)"
            )
        if self.settled_errors:
            lines.append(
                f"  settled    {self.settled_errors:>10,}  dead links and the like, tried in --max-attempts "
                "runs: not tried again until --retry-errors"
            )
        if self.broken_lines:
            lines.append(
                f"  broken     {self.broken_lines:>10,}  lines in OUT that are not complete records "
                "(kept; their items done again)"
            )
        if self.found == 0 and not self.interrupted:
            lines.append(f"  no items found in the sources (exit status {exit_status(Outcome.NO_ITEMS)})")
        if self.duplicates:
            lines.append(f"  duplicate  {self.duplicates:>10,}  repeated in the sources, done once")
        if self.resized:
            lines.append(f"  resized    {self.resized:>10,}  over the size limit, downscaled before sending")
        if self.changed:
            lines.append(
                f"  changed    {self.changed:>10,}  size or mtime differ from their record: done again"
            )
        if self.retagged:
            lines.append(f"  retagged   {self.retagged:>10,}  made with other settings before (--retag)")
        if self.reused:
            lines.append(
                f"  reused     {self.reused:>10,}  same bytes as a tagged file: its tags, no request"
            )
        if self.converted:
            lines.append(f"  converted  {self.converted:>10,}  HEIC/WebP/TIFF/RAW sent as JPEG")
        if self.uprighted:
            lines.append(f"  uprighted  {self.uprighted:>10,}  turned upright by their EXIF orientation")
        if self.compacted:
            lines.append(f"  compacted  {self.compacted:>10,}  superseded records removed from OUT first")
        lines += self.left_out_lines()
        for name, n in self.endpoints.items():
            lines.append(f"  endpoint   {n:>10,}  answered by {name}")
        lines.append(f"  results:   {self.out}")
        return "\n".join(lines)


def write_json(data: dict[str, Any], path: str) -> None:
    """A summary as JSON: ``-`` is standard output; SummaryError when ``path`` cannot be written."""
    text = json.dumps(data, indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise SummaryError(f"--summary-json {path}: {exc.strerror or exc}") from None


class Progress:
    """A tqdm bar on a terminal; silent otherwise."""

    def __init__(self, enabled: bool | None, stream: TextIO | None = None) -> None:
        from tqdm import tqdm  # here: the dry run reads this module but shows no bar

        stream = stream or sys.stderr
        if enabled is None:
            enabled = stream.isatty()
        self._bar = tqdm(
            total=None,
            unit="img",
            file=stream,
            disable=not enabled,
            dynamic_ncols=True,
            smoothing=0.05,
            mininterval=0.5,
        )
        self.enabled = enabled

    def set_total(self, total: int) -> None:
        """The number of items this run will write: known once the sources are all read
        (the walk that yields the items counts them; there is no second walk)."""
        if self.enabled:
            self._bar.total = total
            self._bar.refresh()

    def advance(self, summary: Summary, n: int = 1) -> None:
        if self.enabled:
            self._bar.set_postfix(ok=summary.ok, err=summary.errors, refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
