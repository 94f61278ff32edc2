"""OUT is the user's file too: written only when it is a batchtag results file, never a
SOURCE at the same time, broken lines redone (not trusted), --retry-errors rewrites that
keep the file's mode and never write to a replaced file. Through the CLI where users meet it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from batchtag.pipeline import sink
from batchtag.pipeline.sink import open_sink
from batchtag.records import Record, iter_valid_records
from tests.support import assert_refused, encode_image, read_out, run_local, tiny_jpegs


def snapshot(path: Path) -> tuple[bytes, int, int]:
    info = path.stat()
    return path.read_bytes(), info.st_mtime_ns, stat.S_IMODE(info.st_mode)


def foreign_files(tmp_path: Path) -> dict[str, Path]:
    """Files a slip of the keyboard can give as -o: none of them may change."""
    photo = tmp_path / "holiday.jpg"
    photo.write_bytes(encode_image(size=(64, 48)) + b'\n{"key":"x"}\n')  # even with a newline in it
    table = tmp_path / "list.csv"
    table.write_text("path,comment\nphotos/a.jpg,first\n")
    manifest = tmp_path / "urls.jsonl"
    manifest.write_text('{"path": "photos/a.jpg"}\n{"url": "https://example.invalid/b.jpg"}\n')
    text = tmp_path / "notes.txt"
    text.write_text("no newline at the end")
    ours_then_foreign = tmp_path / "mixed.jsonl"
    record = Record("/x.jpg", "file", "ok", 0, "success", [], 1).to_line()
    ours_then_foreign.write_bytes(record + b"\xff\xd8\xff\xe0 trailing bytes of something else")
    return {p.name: p for p in (photo, table, manifest, text, ours_then_foreign)}


@pytest.mark.parametrize("name", ["holiday.jpg", "list.csv", "urls.jsonl", "notes.txt", "mixed.jsonl"])
def test_out_that_is_not_a_results_file_is_refused_and_left_byte_for_byte(tmp_path, name):
    tiny_jpegs(tmp_path / "photos", 3)
    target = foreign_files(tmp_path)[name]
    before = snapshot(target)
    result = run_local(tmp_path / "photos", "-o", target)
    assert_refused(result, str(target))
    assert snapshot(target) == before


def test_the_runs_own_manifest_as_out_is_refused_untouched(tmp_path):
    tiny_jpegs(tmp_path / "photos", 2)
    manifest = tmp_path / "todo.txt"
    manifest.write_text("photos/img000000.jpg\nphotos/img000001.jpg\n")
    before = snapshot(manifest)
    assert_refused(run_local(manifest, "-o", manifest), "SOURCE")
    assert snapshot(manifest) == before


def test_out_given_again_as_a_source_is_refused_even_through_a_symlink(tmp_path):
    tiny_jpegs(tmp_path / "photos", 3)
    manifest = tmp_path / "a.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"photos/img{i:06}.jpg"}) + "\n" for i in range(3)))
    out = tmp_path / "tags.jsonl"
    first = run_local(manifest, "-o", out)  # `batchtag run *.jsonl -o tags.jsonl`, first time
    assert first.returncode == 0, first.stderr
    before = snapshot(out)
    assert_refused(run_local(manifest, out, "-o", out), "SOURCE")  # ... the second time
    link = tmp_path / "same.jsonl"
    link.symlink_to(out)
    assert_refused(run_local(manifest, link, "-o", out), "SOURCE")
    assert snapshot(out) == before


def test_a_lone_torn_first_record_is_cut_and_redone(tmp_path):
    keys = tiny_jpegs(tmp_path / "photos", 2)
    out = tmp_path / "out.jsonl"
    out.write_bytes(Record(keys[0], "file", "ok", 0, "success", [], 1).to_line()[:30])  # crash mid-write
    result = run_local(tmp_path / "photos", "-o", out)
    assert result.returncode == 0, result.stderr
    assert sorted(read_out(out).keys) == keys


def break_lines(out: Path) -> tuple[list[str], bytes]:
    """Cut line 2 just after a nested ``}`` (it still starts like a record and ends with a
    brace), and run lines 4 and 5 together: the keys of those three lines, the new bytes."""
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 6
    keys = [json.loads(lines[i])["key"] for i in (1, 3, 4)]
    cut = lines[1].index(b"}") + 1  # the end of the first tag object
    assert lines[1][:cut].startswith(b'{"key":"') and lines[1][:cut].endswith(b"}")
    lines[1] = lines[1][:cut] + b"\n"
    lines[3] = lines[3].rstrip(b"\n")
    return keys, b"".join(lines)


def test_broken_lines_in_the_middle_are_counted_reported_and_their_items_redone(tmp_path):
    all_keys = tiny_jpegs(tmp_path / "photos", 8)
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    assert run_local(tmp_path / "photos", "-o", out).returncode == 0
    broken_keys, data = break_lines(out)
    out.write_bytes(data)

    result = run_local(tmp_path / "photos", "-o", out, "--summary-json", summary)
    assert result.returncode == 0, result.stderr
    report = json.loads(summary.read_text())
    assert report["broken_lines"] == 2 and report["done"] == 3 and report["skipped_done"] == 5
    assert "2 line(s) are not complete records" in result.stderr
    assert out.read_bytes().startswith(data)  # the broken lines are kept as they were
    valid = list(iter_valid_records(str(out)))
    assert sorted(r.key for r in valid) == all_keys  # every key exactly one valid record
    assert {r.key for r in valid[-3:]} == set(broken_keys)


def test_many_broken_lines_make_one_warning_not_hundreds(tmp_path):
    keys = tiny_jpegs(tmp_path / "photos", 2)
    out = tmp_path / "out.jsonl"
    good = b"".join(Record(k, "file", "ok", 0, "success", [], 1).to_line() for k in keys)
    cut = Record("/gone.jpg", "file", "ok", 0, "success", [], 1).to_line()[:40] + b"\n"
    out.write_bytes(good[: good.index(b"\n") + 1] + cut * 300 + good[good.index(b"\n") + 1 :])
    result = run_local(tmp_path / "photos", "-o", out)
    assert result.returncode == 0, result.stderr
    assert len(result.stderr.splitlines()) < 12, result.stderr
    assert "300 line(s)" in result.stderr


def test_iter_valid_records_one_per_key_last_complete_wins(tmp_path):
    out = tmp_path / "out.jsonl"
    first = Record("/a.jpg", "file", "error", -9002, "connection failed", [], 3).to_line()
    second = Record("/a.jpg", "file", "ok", 0, "success", [{"tag_name": "猫", "tag_confidence": 9}], 1)
    third_cut = Record("/a.jpg", "file", "error", 14, "x", [], 1).to_line()[:-10] + b"\n"
    other = Record("/b{odd}.jpg", "file", "ok", 0, "success", [], 1).to_line()
    braces = Record("/c}}.jpg", "file", "ok", 0, "success", [], 1).to_line()
    out.write_bytes(first + second.to_line() + other[:-1] + other + third_cut + b"[1,2]\n" + braces)
    records = {r.key: r for r in iter_valid_records(str(out))}
    assert set(records) == {"/a.jpg", "/c}}.jpg"}  # /b: two records run together, not valid
    assert records["/a.jpg"].status == "ok" and records["/a.jpg"].tags == second.tags


def test_retry_errors_keeps_mode_and_removes_only_its_own_stale_temp_files(tmp_path):
    keys = tiny_jpegs(tmp_path / "photos", 3)
    (tmp_path / "photos" / "broken.jpg").write_text("not an image")  # a permanent error
    out = tmp_path / "out.jsonl"
    assert run_local(tmp_path / "photos", "-o", out).returncode == 1
    os.chmod(out, 0o640)
    stale = tmp_path / f".out.jsonl.batchtag-rewrite-{os.getpid()}-dead.tmp"  # a crashed rewrite
    stale.write_bytes(out.read_bytes())
    others = [tmp_path / ".batchtag-unrelated.tmp", tmp_path / ".other.jsonl.batchtag-rewrite-1-a.tmp"]
    for path in others:
        path.write_text("not ours to delete")
    (tmp_path / "photos" / "broken.jpg").write_bytes(encode_image())

    result = run_local(tmp_path / "photos", "-o", out, "--retry-errors")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert not stale.exists() and all(p.exists() for p in others)
    final = read_out(out)
    assert sorted(final.keys) == sorted([*keys, str(tmp_path / "photos" / "broken.jpg")])
    assert all(r["status"] == "ok" for r in final.records)


async def test_out_replaced_between_open_and_lock_is_reopened(tmp_path, monkeypatch):
    """Another run's --retry-errors renames a new OUT into place just after this run opened
    the old one: the lock must end up on the file at OUT's path, never the deleted one."""
    out = tmp_path / "out.jsonl"
    old = Record("/old.jpg", "file", "ok", 0, "success", [], 1).to_line()
    out.write_bytes(old)
    real_lock = sink.lock
    replaced = []

    def lock_after_a_rename(handle, path):
        if not replaced:
            replacement = tmp_path / "replacement"
            replacement.write_bytes(old)
            os.replace(replacement, out)
            replaced.append(True)
        real_lock(handle, path)

    monkeypatch.setattr(sink, "lock", lock_after_a_rename)
    result_sink, checkpoint = open_sink(str(out))
    await result_sink.write([Record("/new.jpg", "file", "ok", 0, "success", [], 1)])
    await result_sink.close()
    assert replaced and checkpoint.records == 1
    assert sorted(read_out(out).keys) == ["/new.jpg", "/old.jpg"]  # written to the live file
