"""The resume stage: the checkpoint scan, and the filter that passes each key on once."""

import threading

import pytest

from batchtag.pipeline.resume import STOP_CHECK_EVERY, ResumeFilter, ScanStopped, Skipped, read_checkpoint
from batchtag.pipeline.sources import Item
from batchtag.records import Record


def line(key, status="ok"):
    return Record(key, "file", status, 0 if status == "ok" else -1400, "m").to_line()


def item(key):
    return Item(key, "file", key)


def test_filter_returns_fresh_items_and_what_it_skipped(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(line("/done-ok") + line("/done-error", "error"))
    resume = ResumeFilter(read_checkpoint(str(out)))
    chunk = [item(k) for k in ("/new", "/done-ok", "/done-error", "/new", "/other")]
    fresh, skipped = resume.new_items(chunk)
    assert [i.key for i in fresh] == ["/new", "/other"]
    assert skipped == Skipped(done=2, duplicates=1)  # old errors: counted from the checkpoint
    again, skipped = resume.new_items([item("/other"), item("/third")])  # seen in an earlier chunk
    assert [i.key for i in again] == ["/third"] and skipped == Skipped(duplicates=1)
    assert resume.new_items([]) == ([], Skipped())


def test_checkpoint_scan_stops_soon_after_the_stop_flag(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(line(f"/k{i}") for i in range(STOP_CHECK_EVERY * 2 + 5)))
    assert read_checkpoint(str(out)).records == STOP_CHECK_EVERY * 2 + 5
    stop = threading.Event()
    stop.set()
    with pytest.raises(ScanStopped):
        read_checkpoint(str(out), stop)
