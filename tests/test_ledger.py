"""Attempts across runs, from OUT's lines: which error records a plain rerun does again
(transient always, settling ones until --max-attempts runs), and the count carried forward."""

from __future__ import annotations

import numpy as np

from batchtag import codes
from batchtag.keyset import fingerprint
from batchtag.pipeline.ledger import FAILURES_LISTED, Ledger
from batchtag.pipeline.resume import read_checkpoint
from batchtag.records import Record


def error(key: str, code: int, runs: int | None = None, http_status: int | None = None) -> Record:
    extra = {} if runs is None else {"run_attempts": runs}
    if http_status is not None:
        extra["http_status"] = http_status
    return Record(key, "url", "error", code, codes.message(code), [], 1, extra)


def checkpoint_of(tmp_path, records, max_attempts=3):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(r.to_line() for r in records))
    return read_checkpoint(str(out), max_attempts=max_attempts)


def redone(checkpoint, key: str) -> bool:
    fp = fingerprint(key)
    fps = np.array([fp], dtype=np.uint64)
    return bool(checkpoint.to_do(fps, fps)[0])


def test_settling_errors_are_redone_until_max_attempts_runs_transient_ones_always(tmp_path):
    records = [
        error("u/dead-once", codes.URL_DOWNLOAD_FAILED, 1),
        error("u/dead-thrice", codes.URL_DOWNLOAD_FAILED, 3),
        error("u/old-record", codes.URL_UNREACHABLE),  # written before run_attempts: 1 run
        error("u/404", codes.CLIENT_HTTP_ERROR, 3, http_status=404),
        error("u/503", codes.CLIENT_HTTP_ERROR, 9, http_status=503),  # transient: always again
        error("u/bad-format", codes.IMAGE_FORMAT, 1),  # permanent: never unasked
    ]
    checkpoint = checkpoint_of(tmp_path, records)
    assert [redone(checkpoint, r.key) for r in records] == [True, False, True, False, True, False]
    assert checkpoint.settled_errors == 2 and checkpoint.transient_errors == 3
    assert redone(checkpoint_of(tmp_path, records, max_attempts=5), "u/dead-thrice")


def test_the_ledger_carries_run_attempts_forward_and_counts_new_and_again(tmp_path):
    checkpoint = checkpoint_of(tmp_path, [error("u/dead", codes.URL_DOWNLOAD_FAILED, 2), error("u/503", 203)])
    ledger = Ledger(checkpoint)
    batch = [
        error("u/dead", codes.URL_DOWNLOAD_FAILED),
        error("u/new", codes.URL_DOWNLOAD_FAILED),
        Record("u/503", "url", "ok", 0, "success", [], 1),
    ]
    ledger.stamp(batch)
    assert [r.extra.get("run_attempts") for r in batch] == [3, 1, None]
    assert (ledger.errors.new, ledger.errors.again, ledger.errors.redone) == (1, 1, 2)
    assert {r.extra["run"] for r in batch} == {ledger.run_id}
    assert [f["key"] for f in ledger.errors.failures] == ["u/dead", "u/new"]
    many = [error(f"u/{i}", codes.URL_FORMAT) for i in range(FAILURES_LISTED + 5)]
    ledger.stamp(many)
    assert len(ledger.errors.failures) == FAILURES_LISTED
