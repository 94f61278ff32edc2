"""The resume stage: what OUT already holds, and the filter that keeps the walker from
sending it again.

``read_checkpoint`` scans OUT once at start-up (keys only, as 8-byte fingerprints);
``ResumeFilter`` then drops, chunk by chunk in the walker thread, the items OUT holds and
the keys the sources repeat. It returns what it skipped as ``Skipped`` counts instead of
touching the run's ``Summary``, which belongs to the event loop.
"""

from __future__ import annotations

import logging
import os
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from batchtag.keyset import KeySet, fingerprint, fingerprint_bytes
from batchtag.records import iter_keys_and_status
from batchtag.sources import Item

log = logging.getLogger("batchtag")

STOP_CHECK_EVERY = 65_536  # lines between two looks at the stop flag (well under 0.1 s)


class ScanStopped(Exception):
    """The checkpoint scan was abandoned because the run is being interrupted."""


@dataclass
class Checkpoint:
    """What OUT already holds: finished keys, and which of them ended in error."""

    done: KeySet = field(default_factory=KeySet)
    errors: KeySet = field(default_factory=KeySet)
    records: int = 0
    error_records: int = 0
    torn_bytes: int = 0  # cut off the end of OUT: a record half-written by a crash
    bad_lines: int = 0


def read_checkpoint(path: str, stop: threading.Event | None = None) -> Checkpoint:
    """Scan OUT for finished keys: only the key and status of each line are decoded.
    Raises ScanStopped soon after ``stop`` is set."""
    checkpoint = Checkpoint()
    if not os.path.exists(path):
        return checkpoint
    # array('Q') holds 8 bytes a key; a list of ints would hold ~40.
    done = array("Q")
    errors = array("Q")

    def bad_line(number: int) -> None:
        checkpoint.bad_lines += 1
        log.warning("%s:%d is not a record; ignored", path, number)

    with open(path, "rb") as handle:
        for key, is_error in iter_keys_and_status(handle, bad_line):
            fp = fingerprint_bytes(key)
            done.append(fp)
            if is_error:
                errors.append(fp)
            if stop is not None and len(done) % STOP_CHECK_EVERY == 0 and stop.is_set():
                raise ScanStopped(path)
    checkpoint.done = KeySet.from_array(np.frombuffer(done, dtype=np.uint64))
    checkpoint.errors = KeySet.from_array(np.frombuffer(errors, dtype=np.uint64))
    checkpoint.records = len(done)
    checkpoint.error_records = len(errors)
    return checkpoint


@dataclass
class Skipped:
    """Items of one chunk that were not passed on."""

    done: int = 0  # already in OUT from an earlier run
    previous_errors: int = 0  # ... of which ended in error
    duplicates: int = 0  # repeated keys in the sources, done once


class ResumeFilter:
    """Passes on each key once, and only if OUT does not hold it. Used from the walker
    thread only (one thread: no lock needed for ``seen``)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self._done = checkpoint.done
        self._errors = checkpoint.errors
        self._seen = KeySet()

    def new_items(self, chunk: Sequence[Item]) -> tuple[list[Item], Skipped]:
        """The chunk's items still to do, and what was skipped. Vectorised: skipping a
        million finished items must not cost a numpy call per item."""
        skipped = Skipped()
        if not chunk:
            return [], skipped
        fingerprints = np.fromiter(
            (fingerprint(item.key) for item in chunk), dtype=np.uint64, count=len(chunk)
        )
        done = self._done.contains_many(fingerprints)
        if done.any():
            skipped.done = int(done.sum())
            skipped.previous_errors = int(self._errors.contains_many(fingerprints[done]).sum())
        fresh = []
        for item, fp, is_done in zip(chunk, fingerprints.tolist(), done.tolist(), strict=True):
            if is_done:
                continue
            if self._seen.add_fingerprint(fp):
                fresh.append(item)
            else:
                skipped.duplicates += 1
        return fresh, skipped
