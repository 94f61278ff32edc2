"""Hostile input for the client: one tree of everything that can go wrong with a file, a
path or a manifest line. Each item ends with exactly one clear record (or a clear skip),
duplicates are done once, the run completes, and a rerun finds everything done."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import time

import pytest
from PIL import Image

from batchtag import api, codes
from tests.support import (
    Spawner,
    encode_image,
    hard_links,
    noisy_jpeg,
    read_out,
    run_cli,
    run_flags,
    vm_rss_kb,
    write_credentials,
)

MB = 1024 * 1024


@pytest.fixture
def spawner(tmp_path):
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.close()


def corrupt_scan(data: bytes) -> bytes:
    """Headers intact, entropy-coded data replaced by garbage (no 0xFF, so no markers)."""
    start = data.index(b"\xff\xda")
    start += 2 + int.from_bytes(data[start + 2 : start + 4], "big")
    garbage = bytes(b % 0xFF for b in random.Random(3).randbytes(len(data) - start - 2))
    return data[:start] + garbage + b"\xff\xd9"


def test_hostile_tree_each_item_gets_one_clear_record_and_the_run_completes(tmp_path, spawner):
    n_links = 20_000
    tree = tmp_path / "tree"
    tree.mkdir()
    good = tree / "good.jpg"
    good.write_bytes(encode_image(size=(16, 12)))
    (tree / "zero.jpg").write_bytes(b"")
    (tree / "truncated.jpg").write_bytes(encode_image(size=(16, 12))[:60])
    (tree / "corrupt.jpg").write_bytes(corrupt_scan(encode_image(size=(64, 48))))
    (tree / "notes.jpg").write_text("meeting notes, not a picture\n" * 20)
    bomb = io.BytesIO()
    Image.new("L", (10000, 10000)).save(bomb, "PNG")  # 100 megapixels in ~100 KB
    (tree / "huge-pixels.png").write_bytes(bomb.getvalue())
    noise = noisy_jpeg((7200, 7200))  # a real photo-like 60 MB JPEG: the client must shrink it
    assert len(noise) > 55 * MB
    (tree / "big-noise.jpg").write_bytes(noise)
    del noise
    junk = b"\xff\xd8\xff\xe0" + random.Random(5).randbytes(60 * MB)  # a JPEG header, then junk
    (tree / "big-junk.jpg").write_bytes(junk)
    del junk
    (tree / "loop").mkdir()
    (tree / "loop" / "self").symlink_to(tree / "loop")  # a directory symlink loop: skipped
    os.symlink("ping.jpg", tree / "pong.jpg")  # a file symlink loop: ELOOP on open
    os.symlink("pong.jpg", tree / "ping.jpg")
    os.symlink(tree / "nowhere.jpg", tree / "dangling.jpg")
    (tree / "folder.jpg").mkdir()  # a directory with an image name: walked, not an item
    (tree / "folder.jpg" / "inner.jpg").write_bytes(encode_image(size=(16, 12)))
    odd_names = ["new\nline.jpg", 'q"uo\\te.jpg', "tab\tand space .JPG", "émoji-🙂.jpeg"]
    for name in odd_names:
        (tree / name).write_bytes(encode_image(size=(16, 12)))
    bad_name = os.fsencode(tree) + b"/bad\xff.jpg"  # not valid UTF-8
    with open(bad_name, "wb") as handle:
        handle.write(encode_image(size=(16, 12)))
    started = time.monotonic()
    links = hard_links(good, tree / "links", n_links)
    link_s = time.monotonic() - started

    manifest = tmp_path / "list.txt"
    manifest.write_text(
        "\n".join(
            [
                "# a comment",
                "",
                "   ",
                "tree/good.jpg",  # relative to the manifest: a duplicate of the walked file
                "./tree/good.jpg",
                str(good),
                "tree/good.jpg",
                "tree/missing.jpg",
                "%%% garbage ☃ \t*** <>|",
                "x" * 5000,  # a name too long for the file system
                "ftp://example.com/a.jpg",
                "file:///etc/passwd",
                "javascript:alert(1)",
                "data:image/png;base64,iVBORw0KGgo=",
                "gopher://example.com/1",
                "http://",
                "https:///no-host.jpg",
                "ftp://example.com/a.jpg",
            ]
        )
        + "\n"
    )
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text(
        "\n".join(
            [
                "{not json",
                "[1, 2]",
                '{"path": 5}',
                '{"url": ""}',
                '"just a string"',
                '{"url": "ftp://example.com/a.jpg"}',
            ]
        )
        + "\n"
    )
    csv = tmp_path / "list.csv"
    csv.write_text("url,path\n,tree/good.jpg\nftp://example.com/b.jpg,\n,,\nmailto:someone@example.com,\n")

    walked = [str(tree / n) for n in ("good.jpg", "zero.jpg", "truncated.jpg", "corrupt.jpg", "notes.jpg")]
    walked += [str(tree / n) for n in ("huge-pixels.png", "big-noise.jpg", "big-junk.jpg", "pong.jpg")]
    walked += [str(tree / n) for n in ("ping.jpg", "dangling.jpg", "folder.jpg/inner.jpg", *odd_names)]
    walked += [os.fsdecode(bad_name), *links]
    manifest_keys = [str(tree / "missing.jpg"), str(tmp_path / "%%% garbage ☃ \t*** <>|")]
    manifest_keys += [str(tmp_path / ("x" * 5000)), "ftp://example.com/a.jpg", "file:///etc/passwd"]
    manifest_keys += ["javascript:alert(1)", "data:image/png;base64,iVBORw0KGgo=", "gopher://example.com/1"]
    manifest_keys += ["http://", "https:///no-host.jpg"]
    bad_lines = [f"{jsonl}:{n}" for n in (1, 2, 3, 4, 5)]
    csv_keys = ["ftp://example.com/b.jpg", "mailto:someone@example.com"]
    expected = set(walked) | set(manifest_keys) | set(bad_lines) | set(csv_keys)
    # tree twice, good.jpg as an argument and 5 times in manifests, an ftp URL 3 times
    duplicates = len(walked) + 1 + 4 + 1 + 2

    _, url = spawner.serve(write_credentials(tmp_path / "creds.json"))
    out, summary_json = tmp_path / "out.jsonl", tmp_path / "summary.json"
    sources = [tree, manifest, jsonl, csv, good, tree]
    args = ["run", *sources, "-o", out, *run_flags(url), "--concurrency", "64", "--no-progress"]
    started = time.monotonic()
    result = run_cli(*args, "--summary-json", summary_json, timeout=180, cwd=tmp_path)
    run_s = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]  # finished, some items failed
    assert "Traceback" not in result.stderr
    assert f"skipped symlink loop: {tree / 'loop' / 'self'}" in result.stderr

    records = read_out(out).by_key()  # valid UTF-8 JSON lines, no key twice
    assert set(records) == expected
    summary = json.loads(summary_json.read_text())
    assert summary["done"] == len(expected) and summary["duplicates"] == duplicates
    assert summary["warnings"] >= 1

    def code(name):
        return records[str(tree / name)]["code"]

    for record in records.values():
        assert record["status"] == ("ok" if record["code"] == codes.OK else "error"), record
        assert record["message"] and "\n" not in record["message"], record
        assert "Traceback" not in record["message"], record
        assert record["code"] != codes.CLIENT_INTERNAL_ERROR, record  # never an internal error
        assert not codes.is_transient(record["code"]), record
    for key in [*links, str(good), str(tree / "folder.jpg/inner.jpg"), *[str(tree / n) for n in odd_names]]:
        assert records[key]["code"] == codes.OK and records[key]["tags"], key
    assert code("zero.jpg") == codes.IMAGE_EMPTY
    assert code("notes.jpg") == codes.IMAGE_FORMAT
    assert code("truncated.jpg") == codes.IMAGE_DECODE_FAILED
    assert code("corrupt.jpg") in (codes.OK, codes.IMAGE_DECODE_FAILED, codes.IMAGE_FORMAT)
    pixels = records[str(tree / "huge-pixels.png")]
    assert (pixels["code"], "pixel" in pixels["message"]) == (codes.IMAGE_TOO_LARGE, True) or (
        pixels["code"] == codes.OK and "resized" in pixels
    ), pixels
    noisy = records[str(tree / "big-noise.jpg")]
    assert noisy["code"] == codes.OK, noisy
    assert noisy["resized"]["from_bytes"] > 55 * MB and noisy["resized"]["to_bytes"] <= api.MAX_IMAGE_BYTES
    assert code("big-junk.jpg") == codes.IMAGE_DECODE_FAILED
    assert records[str(tree / "big-junk.jpg")]["attempts"] == 0  # refused before any request
    for name in ("pong.jpg", "ping.jpg", "dangling.jpg"):
        assert code(name) == codes.CLIENT_INPUT_ERROR
    assert records[str(tree / "dangling.jpg")]["message"] == "file not found"
    assert "symbolic links" in records[str(tree / "ping.jpg")]["message"]
    assert records[str(tree / "missing.jpg")]["message"] == "file not found"
    assert records[str(tmp_path / ("x" * 5000))]["code"] == codes.CLIENT_INPUT_ERROR
    for key in [*manifest_keys[3:], *csv_keys]:
        assert records[key]["code"] == codes.URL_FORMAT and records[key]["source"] == "url", key
    for key in bad_lines:
        assert records[key]["code"] == codes.CLIENT_BAD_MANIFEST_LINE, key

    # The key of a path that is not UTF-8 round-trips to the very same bytes.
    (bad_key,) = [k for k in records if k.endswith(".jpg") and "\udcff" in k]
    assert os.fsencode(bad_key) == bad_name and records[bad_key]["code"] == codes.OK
    assert os.path.exists(os.fsencode(bad_key))

    rerun = run_cli(*args, "--summary-json", summary_json, timeout=120, cwd=tmp_path)
    assert rerun.returncode == 4, rerun.stderr  # nothing new failed; OUT holds the earlier errors
    again = json.loads(summary_json.read_text())  # resume read every odd key back
    assert again["previous_errors"] == sum(r["status"] == "error" for r in records.values())
    assert again["done"] == 0 and again["skipped_done"] + again["duplicates"] == len(expected) + duplicates
    assert len(read_out(out).records) == len(expected)
    print(f"\nhostile tree: {len(expected):,} items; {n_links:,} links in {link_s:.1f} s; run {run_s:.1f} s")


async def test_unshrinkable_oversized_file_has_a_plain_message(tmp_path):
    from batchtag.pipeline.payload import InputError, build_payload
    from batchtag.pipeline.sources import path_item

    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff\xe0" + random.Random(5).randbytes(2 * MB))
    with pytest.raises(InputError) as caught:
        await build_payload(path_item(str(junk)), "1000001", "", max_image_bytes=MB)
    assert caught.value.code == codes.IMAGE_DECODE_FAILED
    assert "object at 0x" not in str(caught.value) and "<_io." not in str(caught.value)


BAD_LINE_CASES = {
    "ipv6-url": ("list.txt", "http://[::1\nhttp://[garbage]/a.jpg\n"),
    "deep-json": ("list.jsonl", "[" * 100_000 + "\n"),
    "huge-csv-field": ("list.csv", "path\n" + "x" * 200_000 + "\n"),
    "nul-in-path": ("list.txt", "b\x00c.jpg\n"),
}


@pytest.mark.parametrize(
    "case",
    [
        "ipv6-url",
        "deep-json",
        "huge-csv-field",
        "nul-in-path",
    ],
)
def test_a_malformed_manifest_line_costs_one_error_record_not_the_run(tmp_path, case):
    name, text = BAD_LINE_CASES[case]
    (tmp_path / "good.jpg").write_bytes(encode_image(size=(16, 12)))
    header = "path\n" if name.endswith(".csv") else ""
    entry = json.dumps({"path": str(tmp_path / "good.jpg")}) if name.endswith(".jsonl") else "good.jpg"
    manifest = tmp_path / name
    manifest.write_text(header + entry + "\n" + text.removeprefix(header))
    out = tmp_path / "out.jsonl"
    result = run_cli(
        "run", manifest, "-o", out, "--endpoint", "local", "--tagger", "color", "--no-progress", timeout=60
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 1, result.stderr[-3000:]
    records = read_out(out).records
    assert [r["code"] for r in records if r["key"] == str(tmp_path / "good.jpg")] == [codes.OK]
    bad = [r for r in records if r["key"] != str(tmp_path / "good.jpg")]
    assert bad and all(r["status"] == "error" and r["code"] != codes.CLIENT_INTERNAL_ERROR for r in bad), bad


@pytest.mark.soak
def test_a_directory_of_100000_entries(tmp_path, spawner):
    """100,000 hard links in one directory: every one tagged once, client memory bounded."""
    targets = [tmp_path / f"good{i}.jpg" for i in range(4)]
    for i, target in enumerate(targets):
        target.write_bytes(encode_image(color=(i * 50, 90, 200)))
    keys = hard_links(targets, tmp_path / "big", 100_000)
    _, url = spawner.serve(write_credentials(tmp_path / "creds.json"))
    out = tmp_path / "out.jsonl"
    args = ["run", tmp_path / "big", "-o", out, *run_flags(url), "--concurrency", "64", "--no-progress"]
    started = time.monotonic()
    client = spawner.start(*args, name="run")
    peak_kb = 0
    while client.poll() is None and time.monotonic() - started < 600:
        with contextlib.suppress(OSError, AssertionError):  # it may just have exited
            peak_kb = max(peak_kb, vm_rss_kb(client.pid))
        time.sleep(0.5)
    assert client.wait(timeout=30) == 0, client.stderr()
    result = read_out(out)
    assert sorted(result.keys) == keys
    assert all(r["status"] == "ok" for r in result.records)
    print(f"\n100,000 entries: {time.monotonic() - started:.1f} s, client peak RSS {peak_kb / 1024:.0f} MiB")
    assert peak_kb < 500 * 1024
