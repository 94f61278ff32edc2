"""The record module: the OUT line layout, written and read back (fast key reader and the
whole-record reader other tools use)."""

import io
import json

import pytest

from batchtag import records
from batchtag.errors import NotAResultsFile
from batchtag.keyset import fingerprint
from batchtag.records import (
    FileFacts,
    Record,
    Settings,
    iter_valid_records,
    load_records,
    parse_record,
    read_blocks,
    read_key_and_status,
    read_key_bytes_and_status,
    scan_blocks,
)
from batchtag.results_file import check_results_file


def scan_lines(lines, settings, on_bad_line):
    """OUT's scan over these whole lines, as one block."""
    return scan_blocks([b"".join(lines)], settings, on_bad_line)


def record(key, status="ok", **extra):
    code = 0 if status == "ok" else -1400
    return Record(key, "file", status, code, "m", [{"tag_name": "猫", "tag_confidence": 9}], 1, extra)


def test_line_is_compact_json_with_key_source_status_first_and_extras_last():
    line = record("/a.jpg", elapsed_ms=12).to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line.startswith(b'{"key":"/a.jpg","source":"file","status":"ok","code":0,')
    data = json.loads(line)
    assert list(data)[-1] == "elapsed_ms" and data["tags"] == [{"tag_name": "猫", "tag_confidence": 9}]
    assert "猫".encode() in line  # UTF-8, not \\u escapes


def test_round_trip_keeps_every_field_including_undecodable_names():
    original = record('/photos/caf\udce9 "q".jpg', "error", resized={"from_bytes": 9})
    line = original.to_line()
    line.decode("utf-8")  # the file stays valid UTF-8
    assert parse_record(line) == original


def test_key_reader_handles_escapes_and_foreign_layouts():
    key = '/photos/路径 "quoted" \\ back\udcff.jpg'  # includes a non-UTF-8 byte (surrogate escape)
    line = record(key, "error").to_line().decode("utf-8")
    assert read_key_and_status(line) == (key, "error")
    assert read_key_and_status('{"status": "ok", "key": "k"}\n') == ("k", "ok")
    with pytest.raises(ValueError):
        read_key_and_status("[1, 2]\n")


def test_byte_key_reader_agrees_with_the_string_reader():
    for key in ("/plain.jpg", 'http://x/y?z=1&w="q"', "/路径/back\\slash.jpg", "/caf\udce9.jpg"):
        for status in ("ok", "error"):
            line = record(key, status).to_line()
            assert read_key_bytes_and_status(line) == (key.encode("utf-8", "surrogatepass"), status)


def test_fast_scan_yields_key_bytes_and_error_code_and_reports_bad_lines():
    whole = record("/e").to_line()
    lines = [
        record("/a").to_line(),
        b"not json\n",
        record("/b\\c", "error").to_line(),  # escaped key: the general path
        b'{"status": "error", "key": "/d", "source": "url", "code": 15, "message": "m"}\n',
        b"[1]\n",
        whole[: whole.index(b"}") + 1] + b"\n",  # cut after a tag: starts and ends like a record
        whole[:30] + whole,  # a torn record, then a whole one on the same line
        whole[:-1] + record("/f").to_line(),  # two whole records on one line
        b'{"status": "ok", "key": "/g"}\n',  # no source, code, message: not a record
        b'{"key":"/i","source":"file","status":"ok"}\n',  # our layout, but no code or message
        record("/h{odd}").to_line(),  # braces in the key: decided by the full parse
    ]
    bad = []
    scan = scan_lines(lines, None, bad.append)
    assert list(scan.keys) == [fingerprint(k) for k in ("/a", "/b\\c", "/d", "/h{odd}")]
    assert [flag & 1 for flag in scan.flags] == [0, 1, 1, 0]  # the error bit
    assert [flag >> 1 & 1 for flag in scan.flags] == [0, 0, 1, 0]  # transient (code 15), redone
    assert bad == [2, 5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize(
    "line",
    [
        b"{broken\n",
        b"[1, 2]\n",
        b'{"key": "/x", "source": "file", "status": "ok", "code": 0}\n',  # no message
        b'{"key": 5, "source": "file", "status": "ok", "code": 0, "message": "m"}\n',
        b'{"key": "/x", "source": "file", "status": "maybe", "code": 0, "message": "m"}\n',
        b'{"key": "/x", "source": "file", "status": "ok", "code": true, "message": "m"}\n',
        b'{"key": "/x", "source": "file", "status": "ok", "code": 0, "message": "m", "tags": 3}\n',
        b"\xff\xfe\n",
    ],
)
def test_parse_record_refuses_what_is_not_a_valid_record(line):
    assert parse_record(line) is None


def test_iter_valid_records_one_per_key_last_complete_wins_broken_and_torn_skipped(tmp_path):
    out = tmp_path / "out.jsonl"
    first_b = record("/b", "error")
    later_b = record("/b", elapsed_ms=5)
    torn_a = record("/a", "error").to_line()[:-8]
    out.write_bytes(
        record("/a").to_line()
        + first_b.to_line()
        + b"{garbage\n"
        + record("/c").to_line()
        + later_b.to_line()
        + b'{"key": "/c", "status": "ok"}\n'  # not valid: must not replace the good /c
        + torn_a  # torn last line: not complete, must not replace /a
    )
    found = list(iter_valid_records(str(out)))
    assert [r.key for r in found] == ["/a", "/c", "/b"]  # file order of the winning lines
    assert found[0] == record("/a") and found[2] == later_b


def test_iter_valid_records_of_an_empty_or_all_broken_file_yields_nothing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"{\n[]\n")
    assert list(iter_valid_records(str(empty))) == [] == list(iter_valid_records(str(broken)))


def test_load_records_hides_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(record("/a").to_line() + record("/a", "error").to_line())
    assert [r["status"] for r in load_records(str(out))] == ["ok", "error"]


def test_iter_valid_records_tells_how_many_records_will_come_before_the_first(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(record("/a").to_line() + record("/b").to_line() + record("/a", "error").to_line())
    heard: list[int] = []
    records = iter_valid_records(str(out), on_count=heard.append)
    assert next(records).key == "/b" and heard == [2]
    assert [r.key for r in records] == ["/a"]


def test_check_results_file_refuses_what_is_not_ours_and_accepts_an_empty_or_torn_out(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list\n" + record("/a").to_line().decode())
    for other in (photo, notes):
        with pytest.raises(NotAResultsFile, match="not a batchtag results file"):
            check_results_file(str(other))
    with pytest.raises(FileNotFoundError):
        check_results_file(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(record("/a").to_line()[:-9])
    check_results_file(str(empty))
    check_results_file(str(torn))


def test_scan_with_settings_still_refuses_cut_and_joined_lines():
    settings = Settings("local", "color", "en")
    whole = Record("/w", "file", "ok", 0, "m", [], 1, settings=settings).to_line()
    lines = [
        whole,
        whole[: whole.rindex(b"}")] + b"\n",  # cut just after the settings object: no tail
        whole[:20] + whole,  # a torn record joined to a whole one: ends with the tail
        whole[: whole.index(b',"settings"')] + b"}\n",  # complete, without settings
    ]
    bad = []
    scan = scan_lines(lines, settings, bad.append)
    assert list(scan.keys) == [fingerprint("/w"), fingerprint("/w")]
    assert bad == [2, 3]


def test_the_url_fast_path_decides_as_the_general_path():
    """ok URL records with the current settings take a short path in scan_lines: the same
    keys, states and flags as the full parse gives, and still no joined or escaped lines."""
    settings = Settings("https://svc.example")
    url = Record("https://x.example/a.jpg", "url", "ok", 0, "m", [], 1, settings=settings).to_line()
    escaped = Record('https://x.example/"q".jpg', "url", "ok", 0, "m", [], 1, settings=settings).to_line()
    lines = [url, url[:20] + url, escaped]
    bad = []
    scan = scan_lines(lines, settings, bad.append)
    assert bad == [2]
    expected = [fingerprint("https://x.example/a.jpg"), fingerprint('https://x.example/"q".jpg')]
    assert list(scan.keys) == expected and list(scan.states) == expected
    assert list(scan.flags) == [0, 0]
    general = scan_lines(lines, None, [].append)  # no settings: the general path only
    assert list(general.keys) == expected and list(general.states) == expected


# --- the block scan: its fast paths decide every line as the general path does ---------------

SERVICE = Settings("https://svc.example")


def url_line(key, status="ok", code=0, settings=SERVICE, **extra):
    return Record(key, "url", status, code, "m", [], 1, extra, settings=settings).to_line()


def mixed_lines():
    """ok URL lines with plain keys (the fast paths) among every other kind of line."""
    facts = FileFacts(10, 20, "ab" * 16)
    plain = [url_line(f"https://x.example/{i}.jpg") for i in range(40)]
    whole = url_line("https://x.example/whole.jpg")
    return [
        *plain[:10],
        url_line("https://x.example/ü 中 {odd} [x].jpg"),  # non-ASCII, braces, a space: still plain
        url_line('https://x.example/"q"\\b.jpg'),  # escaped: the general path
        url_line(""),  # an empty key
        url_line("https://x.example/e.jpg", "error", -1507, run_attempts=2),  # settles
        url_line("https://x.example/t.jpg", "error", 15),  # transient
        url_line("https://x.example/o.jpg", settings=Settings("https://other.example")),
        url_line("https://x.example/n.jpg", settings=None),
        Record("/f.jpg", "file", "ok", 0, "m", [], 1, file=facts, settings=SERVICE).to_line(),
        *plain[10:20],
        b"\n",  # blank
        b"not json\n",
        whole[:30] + whole,  # a torn record joined to a whole one
        whole[: whole.rindex(b"}")] + b"\n",  # cut before its last brace
        whole.replace(b"\n", b"\r\n"),  # CRLF: not our layout, but a record
        *plain[20:],
        plain[0][:-9],  # a torn last line, no newline
    ]


def general_scan(lines, settings, bad):
    """The reference: every line through the general path, one at a time."""
    scanner = records._BlockScanner(settings, bad.append)
    scanner.line_heads = scanner.each_line = None
    for line in lines:
        scanner.block(line)
    return scanner.scan


def as_tuple(scan):
    return (
        list(scan.keys), list(scan.states), list(scan.flags), list(scan.content),
        list(scan.content_offsets), scan.other_settings_line, list(scan.settling_lines),
        list(scan.settling_runs),
    )  # fmt: skip


@pytest.mark.parametrize("block_size", [1 << 21, 4096, 700, 1])
def test_block_scan_decides_as_the_general_path(block_size):
    lines = mixed_lines()
    expected_bad: list[int] = []
    expected = as_tuple(general_scan(lines, SERVICE, expected_bad))
    bad: list[int] = []
    scan = scan_blocks(read_blocks(io.BytesIO(b"".join(lines)), block_size), SERVICE, bad.append)
    assert as_tuple(scan) == expected
    assert bad == expected_bad == [29, 30, 31, 32, len(lines)]
    assert len(scan.keys) == len(lines) - 5 and list(scan.settling_runs) == [2]


def test_a_second_record_after_a_plain_head_is_a_bad_line_in_any_block():
    """Joined after the head: the line starts and ends like a plain one."""
    whole = url_line("https://x.example/whole.jpg")
    joined = whole[: whole.index(b'"code":') + 8] + whole
    plain = [url_line(f"https://x.example/{i}.jpg") for i in range(5)]
    for lines in ([*plain, joined, *plain], [joined, *plain], [*plain, joined]):
        bad: list[int] = []
        scan = scan_blocks([b"".join(lines)], SERVICE, bad.append)
        assert as_tuple(scan) == as_tuple(general_scan(lines, SERVICE, []))
        assert bad == [lines.index(joined) + 1]


def test_other_whole_records_among_plain_lines_take_the_general_path_in_place(monkeypatch):
    """Every line one record (the usual OUT: errors, files, older or other settings among
    the ok URL lines): the plain ones by head and tail, the others line by line, in order."""
    facts = FileFacts(10, 20, "cd" * 16)
    plain = [url_line(f"https://x.example/{i}.jpg") for i in range(30)]
    others = [
        url_line("https://x.example/e.jpg", "error", -1507, run_attempts=2),
        url_line("https://x.example/t.jpg", "error", 15),
        Record("/f.jpg", "file", "ok", 0, "m", [], 1, file=facts, settings=SERVICE).to_line(),
        url_line('https://x.example/"q".jpg'),
        url_line(""),
        url_line("https://x.example/o.jpg", settings=Settings("https://other.example")),  # no tail
        url_line("https://x.example/n.jpg", settings=None),
    ]
    lines = [*others[:1], *plain[:10], *others[1:3], *plain[10:20], *others[3:], *plain[20:]]
    expected = as_tuple(general_scan(lines, SERVICE, []))

    def refuse(*_):
        raise AssertionError("a block of whole records left the head path")

    monkeypatch.setattr(records._BlockScanner, "_mostly_plain", refuse)
    scan = scan_blocks([b"".join(lines)], SERVICE)
    assert as_tuple(scan) == expected
    assert list(scan.content_offsets) == [sum(map(len, lines[: lines.index(others[2])]))]
    assert list(scan.settling_lines) == [0] and list(scan.flags)[:2] == [1 + 16, 0]


def test_a_block_of_plain_url_lines_takes_no_line_by_line_path(monkeypatch):
    lines = [url_line(f"https://x.example/{i}.jpg") for i in range(500)]
    expected = as_tuple(general_scan(lines, SERVICE, []))

    def refuse(*_):
        raise AssertionError("a plain line took the general path")

    monkeypatch.setattr(records._BlockScanner, "_general", refuse)
    monkeypatch.setattr(records._BlockScanner, "_mostly_plain", refuse)
    assert as_tuple(scan_blocks([b"".join(lines)], SERVICE)) == expected


def test_read_blocks_ends_blocks_at_line_ends_and_keeps_every_byte():
    data = b"ab\ncd\r\nlong line without end" + b"x" * 50
    for size in (1, 3, 8, 1 << 20):
        blocks = list(read_blocks(io.BytesIO(data), size))
        assert b"".join(blocks) == data
        assert all(block.endswith(b"\n") for block in blocks[:-1])
    assert list(read_blocks(io.BytesIO(b"a\rb\rc"), 2, line_ends=b"\n\r")) == [b"a\r", b"b\r", b"c"]
