"""``batchtag run --dry-run``: what a run would cost, before it starts. Sends nothing,
writes nothing (OUT is only read, not locked; no temp file, no lock file).

It walks the sources and reads OUT's checkpoint exactly as the run does (``sources``,
``resume.read_checkpoint``, ``resume.ResumeFilter``), so the items it calls new, changed
and already done are the run's. Files still to do are read and hashed (XXH3-128, as the
run's preparers do, without decoding) to find copies: of an ok record in OUT (reusable)
and of another item of this run (sent once). What is left is the number of requests the
run will send on first attempts; retries of transient failures come on top. The one
place it may count high: a file whose conversion (HEIC, RAW ...) fails in the run is
refused there without a request, and counted here as one.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from batchtag.config import RunConfig
from batchtag.errors import ConfigError, NotAResultsFile, SinkError
from batchtag.keyset import KeySet
from batchtag.pipeline.excludes import LeftOut, WalkRules
from batchtag.pipeline.resume import Checkpoint, ResumeFilter, read_checkpoint, refuse_other_settings
from batchtag.pipeline.sink import refuse_out_among_sources
from batchtag.pipeline.sources import Chunk, Item, Walk, check_source, iter_chunks, url_problem
from batchtag.records import content_fingerprint
from batchtag.results_file import check_results_file

log = logging.getLogger("batchtag")

CHUNK = 4096  # items through the resume filter at a time (a .txt manifest: a block)
READ_BATCH = 64  # files read and hashed together


@dataclass
class Estimate:
    """The dry run's counts (``--summary-json`` writes them as they are named here)."""

    out: str = ""
    found: int = 0  # items the sources gave
    new: int = 0  # no record in OUT
    changed: int = 0  # a record, but the file's size or mtime differ: done again
    retagged: int = 0  # a record made with other settings, done again (--retag)
    redone_errors: int = 0  # an error record done again (transient, or its file changed)
    duplicates: int = 0  # repeated keys in the sources, done once
    copies: int = 0  # same bytes as another item of this run: sent once
    done: int = 0  # unchanged in OUT: skipped
    reusable: int = 0  # same bytes as an ok record in OUT: its tags, no request
    refused: int = 0  # known bad before any request (unreadable, empty, bad manifest line, bad URL)
    left_out: LeftOut = field(default_factory=LeftOut)  # what the walk did not take
    requests: int = 0  # first attempts the run would send
    max_requests: int | None = None  # --max-requests: the run stops there
    qps: float | None = None  # all endpoints together; None: no quota set
    wall_s: float = 0.0

    @property
    def seconds_at_quota(self) -> float | None:
        if not self.qps:
            return None
        return self.capped_requests / self.qps

    @property
    def capped_requests(self) -> int:
        return self.requests if self.max_requests is None else min(self.requests, self.max_requests)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["left_out"] = self.left_out.to_dict()
        data["left_out_files"] = sum(self.left_out.by_reason().values())
        data["capped_requests"] = self.capped_requests
        data["seconds_at_quota"] = self.seconds_at_quota
        data["dry_run"] = True
        return data

    def render(self) -> str:
        rows = [
            ("found", self.found, "items in the sources"),
            ("new", self.new, "not in OUT"),
            (
                "changed",
                self.changed + self.redone_errors,
                "in OUT, but changed (or a transient error): again",
            ),
            ("retagged", self.retagged, "made with other settings (--retag)"),
            ("done", self.done, "in OUT unchanged: skipped"),
            ("reusable", self.reusable, "same bytes as an ok record in OUT: no request"),
            ("duplicate", self.duplicates, "repeated in the sources, done once"),
            ("copies", self.copies, "same bytes as another item: sent once"),
            ("refused", self.refused, "bad before any request (unreadable, empty, bad line)"),
            ("left out", sum(self.left_out.by_reason().values()), "files the walk left out"),
        ]
        lines = [
            f"batchtag: dry run over {self.found:,} items in {self.wall_s:.1f} s: nothing sent or written"
        ]
        lines += [f"  {name:<10} {n:>10,}  {what}" for name, n, what in rows if n or name in ("found", "new")]
        lines.append(
            f"  requests   {self.requests:>10,}  the run would send (first attempts; retries on top)"
        )
        if self.max_requests is not None and self.requests > self.max_requests:
            lines.append(f"  capped     {self.max_requests:>10,}  by --max-requests: the run stops there")
        if self.qps:
            lines.append(
                f"  time       {format_duration(self.seconds_at_quota or 0.0):>10}  at {self.qps:g} requests/s"
            )
        else:
            lines.append("  time               ?  no quota (qps) set: as fast as the service answers")
        lines.append(f"  results:   {self.out}")
        return "\n".join(lines)


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def total_qps(config: RunConfig) -> float | None:
    """The quotas added up; None when any endpoint has none (its speed is the service's)."""
    if config.endpoint_specs:
        rates = [spec.qps for spec in config.endpoint_specs]
        return None if any(r is None for r in rates) else float(sum(rates))
    return config.qps


def dry_run(config: RunConfig) -> Estimate:
    """Count what ``batchtag run`` would do with ``config``; reads only."""
    started = time.monotonic()
    if config.retry_errors:
        raise ConfigError("--dry-run does not count --retry-errors yet: leave one of them out")
    for source in config.sources:
        check_source(source)
    refuse_out_among_sources(config.out, config.sources)
    checkpoint = read_out_readonly(config)
    estimate = Estimate(out=config.out, max_requests=config.max_requests, qps=total_qps(config))
    walk = Walk(rules=WalkRules(tuple(config.exclude), config.include_hidden), left_out=estimate.left_out)
    walk.warn = lambda message: log.warning("%s", message)
    counter = Tally(checkpoint, estimate, config.max_file_bytes)
    for chunk in iter_chunks(config.sources, walk=walk, size=CHUNK):
        counter.add(chunk)
    counter.finish()
    estimate.wall_s = time.monotonic() - started
    return estimate


def read_out_readonly(config: RunConfig) -> Checkpoint:
    """OUT's checkpoint without the sink: no lock, no repair, no write. A torn last line is
    simply not a record (the run would cut it off and redo its item)."""
    if not os.path.lexists(config.out):
        return Checkpoint()
    if not os.path.isfile(config.out):
        raise SinkError(f"cannot use {config.out}: not a regular file")
    try:
        check_results_file(config.out)
    except NotAResultsFile as exc:
        raise SinkError(f"{exc}: refusing to use it as OUT") from None
    except OSError as exc:
        raise SinkError(f"cannot read {config.out}: {exc.strerror or exc}") from None
    settings = config.settings()
    checkpoint = read_checkpoint(config.out, settings=settings, max_attempts=config.max_attempts)
    if not config.retag:
        refuse_other_settings(checkpoint, settings, config.out)
    return checkpoint


class Tally:
    """The resume filter's verdicts, then copies by content among the files to do."""

    def __init__(self, checkpoint: Checkpoint, estimate: Estimate, max_file_bytes: int) -> None:
        self.checkpoint = checkpoint
        self.estimate = estimate
        self.max_file_bytes = max_file_bytes
        self.resume = ResumeFilter(checkpoint)
        self.seen_content = KeySet()
        self.files: list[Item] = []

    def add(self, chunk: Chunk) -> None:
        fresh, fingerprints, skipped = self.resume.fresh_in(chunk)
        estimate = self.estimate
        estimate.found += len(chunk)
        estimate.done += skipped.done
        estimate.duplicates += skipped.duplicates
        self.sort_known(fingerprints)
        for item in fresh:
            if item.error_code is not None:
                estimate.refused += 1
            elif item.kind == "url":
                if url_problem(item.location):
                    estimate.refused += 1
                else:
                    estimate.requests += 1
            else:
                self.files.append(item)
                if len(self.files) >= READ_BATCH:
                    self.read_files()

    def sort_known(self, fps: np.ndarray) -> None:
        """The items to do (their key fingerprints): new to OUT, or known there (made
        otherwise, an error record to redo, or changed since)."""
        if not len(fps):
            return
        known = (
            self.checkpoint.done.contains_many(fps) if len(self.checkpoint.done) else np.zeros(len(fps), bool)
        )
        self.estimate.new += int((~known).sum())
        if not known.any():
            return
        fps = fps[known]
        other = self.checkpoint.other_settings.contains_many(fps)
        errors = self.checkpoint.errors.contains_many(fps) & ~other
        self.estimate.retagged += int(other.sum())
        self.estimate.redone_errors += int(errors.sum())
        self.estimate.changed += int((~other & ~errors).sum())

    def read_files(self) -> None:
        from batchtag.pipeline.payload import read_images_now  # Pillow and friends: only for files

        for read in read_images_now(self.files, self.max_file_bytes):
            if isinstance(read, Exception) or not read.data:
                self.estimate.refused += 1
                continue
            digest = read.facts.xxh3_128 if read.facts else None
            if digest is None:
                self.estimate.requests += 1
                continue
            fp = content_fingerprint(digest)
            if self.checkpoint.content.find(fp) is not None:
                self.estimate.reusable += 1
            elif not self.seen_content.add_many([fp])[0]:
                self.estimate.copies += 1
            else:
                self.estimate.requests += 1
        self.files.clear()

    def finish(self) -> None:
        if self.files:
            self.read_files()
