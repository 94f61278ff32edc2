"""The resume stage: the checkpoint scan, and the filter that passes each key on once."""

import threading

import numpy as np
import pytest

from batchtag import codes
from batchtag.keyset import fingerprint, fingerprint_bytes
from batchtag.pipeline.resume import ResumeFilter, ScanStopped, Skipped, last_of_each, read_checkpoint
from batchtag.pipeline.sources import Item, UrlChunk
from batchtag.records import SCAN_BLOCK, Record, Settings


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
    lines = 2 * SCAN_BLOCK // len(line("/k0")) + 5  # blocks of OUT scanned: more than one
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(line(f"/k{i}") for i in range(lines)))
    assert read_checkpoint(str(out)).records == lines
    stop = threading.Event()
    stop.set()
    with pytest.raises(ScanStopped):
        read_checkpoint(str(out), stop)


def url_record(key, code=0, **extra):
    status = "ok" if code == 0 else "error"
    return Record(key, "url", status, code, "m", [], 1, extra, settings=Settings("https://svc.example"))


def test_a_url_chunk_is_filtered_as_its_items_are(tmp_path):
    """The URL fast path (no Item a URL) decides and counts as the Item path: done, redone
    errors (transient; settling under --max-attempts), retagged, repeats in and across chunks."""
    out = tmp_path / "out.jsonl"
    lines = [
        url_record("https://x/done"),
        url_record("https://x/transient", 15),
        url_record("https://x/settling-once", codes.URL_UNREACHABLE),
        url_record("https://x/settled", codes.URL_UNREACHABLE, run_attempts=3),
        url_record("https://x/permanent", codes.URL_FORMAT),
        Record("https://x/other", "url", "ok", 0, "m", [], 1, settings=Settings("https://other.example")),
    ]
    out.write_bytes(b"".join(r.to_line() for r in lines))
    keys = [r.key for r in lines] + ["https://x/new", "https://x/new", "https://x/done", "https://x/newer"]
    checkpoint = read_checkpoint(str(out), settings=Settings("https://svc.example"), max_attempts=3)
    by_items, by_urls = ResumeFilter(checkpoint), ResumeFilter(checkpoint)
    for part in (keys[:7], keys[7:], keys):  # the last: everything repeated from earlier chunks
        fresh, skipped = by_items.new_items([Item(k, "url", k) for k in part])
        encoded = [k.encode() for k in part]
        chunk = UrlChunk(encoded, np.fromiter(map(fingerprint_bytes, encoded), dtype=np.uint64))
        url_fresh, fps, url_skipped = by_urls.fresh_in(chunk)
        assert (url_fresh, url_skipped) == (fresh, skipped)
        assert list(fps) == [fingerprint(i.key) for i in fresh]
    first = ResumeFilter(checkpoint).new_items([Item(k, "url", k) for k in keys[:7]])
    assert [i.key for i in first[0]] == [
        "https://x/transient",
        "https://x/settling-once",
        "https://x/other",
        "https://x/new",
    ]
    assert first[1] == Skipped(done=3, retagged=1)  # redone errors are counted from the checkpoint


def test_the_last_line_of_each_key_wins_however_the_sort_orders_equal_keys():
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 50, 5000).astype(np.uint64)  # many repeats of each key
    winners, unique = last_of_each(keys)
    last = {int(key): line for line, key in enumerate(keys.tolist())}
    assert unique.tolist() == sorted(last) and winners.tolist() == [last[k] for k in sorted(last)]
    empty = last_of_each(np.empty(0, dtype=np.uint64))
    assert len(empty[0]) == len(empty[1]) == 0


def test_a_later_error_replaces_an_earlier_ok_record_and_back(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(line("/a") + line("/b") + line("/a", "error") + line("/b", "error") + line("/b"))
    checkpoint = read_checkpoint(str(out))
    assert checkpoint.records == 2 and checkpoint.error_records == 1
    assert "/a" in checkpoint.errors and "/b" not in checkpoint.errors
