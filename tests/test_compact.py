"""`batchtag compact`: one record per key, atomically, with the sink's rewrite; a run
compacts by itself past a share of superseded records; SIGKILL at any point loses nothing."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest

from batchtag.pipeline.compact import compact
from batchtag.pipeline.sink import AUTO_MIN_SUPERSEDED, PAUSE_ENV
from batchtag.records import Record, Settings, iter_valid_records
from tests.support import Spawner, run_cli, run_local, tiny_jpegs, wait_until

LOCAL_COLOR = Settings("local", "color", "zh")


def url_records(path: Path, keys: int, versions: int, settings: Settings | None = LOCAL_COLOR) -> bytes:
    """OUT with ``versions`` records a key (the last one valid), interleaved as reruns write
    them, plus one line that is not a record (kept by every rewrite). Returns the bytes."""
    lines = []
    for version in range(versions):
        for i in range(keys):
            tags = [{"tag_name": f"v{version}", "tag_confidence": 50 + version}]
            record = Record(f"https://example.test/{i:06d}.jpg", "url", "ok", 0, "success", tags, 1)
            record.settings = settings
            lines.append(record.to_line())
        if version == 0:
            lines.append(b"not a record: someone's note\n")
    data = b"".join(lines)
    path.write_bytes(data)
    return data


def compacted_bytes(data: bytes, keys: int, versions: int) -> bytes:
    """What compaction must leave: each key's last record in file order, the note after the
    first of them (OUT must start with a record to stay recognisably ours)."""
    lines = data.splitlines(keepends=True)
    kept = lines[-keys:]
    return b"".join([kept[0], lines[keys], *kept[1:]]) if versions > 1 else data


def test_compact_keeps_the_valid_record_of_each_key_and_the_mode(tmp_path):
    out = tmp_path / "out.jsonl"
    data = url_records(out, 50, 3)
    out.chmod(0o640)
    counts = compact(str(out))
    assert (counts.lines, counts.kept, counts.superseded) == (150, 50, 100)
    assert out.read_bytes() == compacted_bytes(data, 50, 3)
    assert {r.tags[0]["tag_name"] for r in iter_valid_records(str(out))} == {"v2"}
    assert (out.stat().st_mode & 0o777) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]  # no temp file left


def test_compact_refuses_what_is_not_a_results_file_and_leaves_it(tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my notes\n")
    result = run_cli("compact", notes)
    assert result.returncode == 2 and "not a batchtag results file" in result.stderr
    assert notes.read_text() == "my notes\n"
    missing = run_cli("compact", tmp_path / "none.jsonl")
    assert missing.returncode == 2 and not (tmp_path / "none.jsonl").exists()


def is_stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.parametrize("point", ["rewrite-copying", "rewrite-copied", "rewrite-renamed"])
def test_sigkill_during_compaction_leaves_the_old_or_the_new_out_complete(tmp_path, point):
    out = tmp_path / "out.jsonl"
    keys, versions = 8000, 3  # > 1 MiB of kept lines: the copy writes, then pauses, mid-way
    old = url_records(out, keys, versions)
    new = compacted_bytes(old, keys, versions)
    spawner = Spawner(tmp_path)
    try:
        proc = spawner.start("compact", out, env={PAUSE_ENV: point})
        wait_until(lambda: is_stopped(proc.pid), 60, f"compaction to pause at {point}", alive=proc)
        proc.signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        spawner.close()
    after = out.read_bytes()
    assert after == (new if point == "rewrite-renamed" else old)
    assert len(list(iter_valid_records(str(out)))) == keys
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".out.jsonl.batchtag-rewrite-")]
    assert len(leftovers) == (0 if point == "rewrite-renamed" else 1)
    # The next compaction (or run) removes the dead one's temp file and finishes the job.
    assert run_cli("compact", out).returncode == 0
    assert out.read_bytes() == new
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.jsonl.batchtag-rewrite-")]


def test_a_run_compacts_by_itself_past_half_superseded(tmp_path):
    out = tmp_path / "out.jsonl"
    keys = AUTO_MIN_SUPERSEDED
    url_records(out, keys, 3)  # 2 of 3 record lines superseded: over the share
    manifest = tmp_path / "urls.txt"
    manifest.write_text("".join(f"https://example.test/{i:06d}.jpg\n" for i in range(keys)))
    result = run_local(manifest, "-o", out, "--summary-json", tmp_path / "s.json")
    assert result.returncode == 0, result.stderr
    assert "compacted" in result.stderr and "skipped" in result.stderr
    assert out.read_bytes().count(b"\n") == keys + 1  # one record a key, and the note
    # Under the share: left as it is.
    url_records(out, keys, 2)
    size = out.stat().st_size
    assert run_local(manifest, "-o", out).returncode == 0
    assert out.stat().st_size == size


def test_a_moved_archive_then_compact_drop_missing_then_report_and_export(tmp_path):
    photos = tmp_path / "photos"
    tiny_jpegs(photos, 6)
    out = tmp_path / "out.jsonl"
    assert run_local(photos, "-o", out).returncode == 0
    moved = tmp_path / "nas" / "photos"
    moved.parent.mkdir()
    photos.rename(moved)
    again = run_local(moved, "-o", out, "--summary-json", tmp_path / "s.json")
    assert again.returncode == 0 and "reused" in again.stderr
    assert len(list(iter_valid_records(str(out)))) == 12  # the old paths' records are still there

    result = run_cli("compact", out, "--drop-missing")
    assert result.returncode == 0, result.stderr
    assert "6 records kept" in result.stderr and "6 of missing files" in result.stderr
    keys = [r.key for r in iter_valid_records(str(out))]
    assert sorted(keys) == sorted(str(p) for p in moved.iterdir())
    assert out.read_bytes().count(b"\n") == 6

    report = run_cli("report", out, "-o", tmp_path / "report.html", "--no-progress")
    assert report.returncode == 0 and "report of 6 items" in report.stderr
    table = run_cli("export", out, "--format", "csv", "--no-progress")
    assert table.returncode == 0 and "6 rows" in table.stderr
    with open(tmp_path / "out.csv", newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["key"] for row in rows) == sorted(keys)
    assert all(row["made"].endswith("Z") and row["run"] for row in rows)
    xmp = run_cli("export", out, "--format", "xmp", "--no-progress")
    assert xmp.returncode == 0 and "6 created" in xmp.stderr and "0 images missing" in xmp.stderr
