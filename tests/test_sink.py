"""The sink and checkpoint: torn tails repaired, keys read back, errors dropped atomically."""

import os

import pytest

from batchtag.errors import SinkError
from batchtag.pipeline.resume import read_checkpoint
from batchtag.pipeline.sink import open_sink
from batchtag.records import Record, read_key_and_status


def record(key, status="ok", **extra):
    return Record(
        key,
        "file",
        status,
        0 if status == "ok" else -1400,
        "m",
        [{"tag_name": "猫", "tag_confidence": 9}],
        1,
        extra,
    )


async def test_records_round_trip_and_checkpoint_reads_keys(tmp_path):
    out = str(tmp_path / "out.jsonl")
    sink, checkpoint = open_sink(out)
    assert checkpoint.records == 0
    await sink.write([record("/a.jpg"), record("/b.jpg", "error"), record('http://x/y?z=1&w="q"')])
    await sink.close()
    checkpoint = read_checkpoint(out)
    assert checkpoint.records == 3 and checkpoint.error_records == 1
    assert "/a.jpg" in checkpoint.done and "/b.jpg" in checkpoint.errors and "/a.jpg" not in checkpoint.errors
    assert 'http://x/y?z=1&w="q"' in checkpoint.done and "/c.jpg" not in checkpoint.done


async def test_torn_last_line_is_cut_off_on_open(tmp_path):
    out = tmp_path / "out.jsonl"
    good = record("/a.jpg").to_line() + record("/b.jpg").to_line()
    out.write_bytes(good + record("/c.jpg").to_line()[:25])
    sink, checkpoint = open_sink(str(out))
    await sink.close()
    assert out.read_bytes() == good
    assert checkpoint.records == 2 and checkpoint.torn_bytes == 25 and "/c.jpg" not in checkpoint.done


async def test_retry_errors_rewrites_out_without_error_records(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(r.to_line() for r in [record("/a"), record("/b", "error"), record("/c")]))
    inode = os.stat(out).st_ino
    sink, checkpoint = open_sink(str(out), retry_errors=True)
    await sink.write([record("/b")])
    await sink.close()
    keys = [read_key_and_status(line) for line in out.read_text().splitlines()]
    assert keys == [("/a", "ok"), ("/c", "ok"), ("/b", "ok")]
    assert "/b" not in checkpoint.done and checkpoint.records == 2
    assert os.stat(out).st_ino != inode  # replaced by rename, never edited in place
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


async def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    out = str(tmp_path / "out.jsonl")
    sink, _ = open_sink(out)
    with pytest.raises(SinkError, match="in use"):
        open_sink(out)
    await sink.close()
    sink, _ = open_sink(out)  # free again once closed
    await sink.close()


def test_unwritable_out_is_a_clear_error(tmp_path):
    with pytest.raises(SinkError, match="cannot open"):
        open_sink(str(tmp_path / "no" / "such" / "dir" / "out.jsonl"))


# --- several records for one key: the last complete one is valid ------------------------------


def facts(size, mtime_ns=1, digest="0" * 32):
    from batchtag.records import FileFacts

    return FileFacts(size, mtime_ns, digest)


def test_checkpoint_takes_the_last_record_of_each_key(tmp_path):
    from batchtag.records import Settings

    settings = Settings("local", "color", "en")
    out = tmp_path / "out.jsonl"
    rows = [
        Record("/x.jpg", "file", "ok", 0, "m", [], 1, file=facts(10, digest="cd" * 16), settings=settings),
        Record("/x.jpg", "file", "error", -1400, "m", [], 1, file=facts(11, digest=None), settings=settings),
        Record("/y.jpg", "file", "error", -1400, "m", [], 1, file=facts(5), settings=settings),
        Record("/y.jpg", "file", "ok", 0, "m", [], 1, file=facts(6, digest="ab" * 16), settings=settings),
        Record(
            "/z.jpg", "file", "ok", 0, "m", [], 1, file=facts(7), settings=Settings("local", "color", "zh")
        ),
    ]
    out.write_bytes(b"".join(r.to_line() for r in rows))
    checkpoint = read_checkpoint(str(out), settings=settings)
    assert checkpoint.records == 3 and checkpoint.lines == 5
    assert "/x.jpg" in checkpoint.errors and "/y.jpg" not in checkpoint.errors
    assert "/z.jpg" in checkpoint.other_settings and checkpoint.other_example.lang == "zh"
    # ok records made with these settings index their content; the error and zh ones do not
    assert checkpoint.content.find(int("ab" * 8, 16)) == len(
        rows[0].to_line() + rows[1].to_line() + rows[2].to_line()
    )
    assert checkpoint.content.find(0) is None and len(checkpoint.content) == 2


async def test_retry_errors_keeps_only_the_valid_record_of_each_key(tmp_path):
    from batchtag.records import iter_valid_records

    out = tmp_path / "out.jsonl"
    rows = [record("/a", v=1), record("/b", "error"), record("/a", v=2), record("/c"), record("/c", "error")]
    out.write_bytes(b"".join(r.to_line() for r in rows))
    sink, checkpoint = open_sink(str(out), retry_errors=True)
    await sink.close()
    assert [r.key for r in iter_valid_records(str(out))] == ["/a"]
    assert out.read_bytes() == record("/a", v=2).to_line()
    assert "/c" not in checkpoint.done and "/b" not in checkpoint.done
