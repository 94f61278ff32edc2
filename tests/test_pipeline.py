"""batchtag run end to end against a real `batchtag serve` app on loopback."""

import asyncio
import json
import os
import time

import pytest

from batchtag import codes, run_batch
from batchtag.pipeline.client import CredentialsRefused
from batchtag.records import iter_valid_records, load_records
from tests.support import encode_image, noisy_jpeg, run_config, with_comment


def write_jpeg(path, size=(32, 24), color=(20, 120, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(with_comment(encode_image(size=size, color=color), str(path)))
    return path


def make_tree(root, n):
    return [write_jpeg(root / f"d{i % 7}" / f"img{i:04}.jpg", color=(i % 255, 80, 160)) for i in range(n)]


def keys_of(out):
    return [r["key"] for r in load_records(out)]


async def test_run_tags_every_image_once(serve, creds, tmp_path):
    server = await serve()
    paths = make_tree(tmp_path / "photos", 40)
    out = tmp_path / "out.jsonl"
    summary = await run_batch(run_config(server, creds, [tmp_path / "photos"], out))
    records = load_records(out)
    assert sorted(r["key"] for r in records) == sorted(str(p) for p in paths)
    assert all(r["status"] == "ok" and r["code"] == 0 and r["tags"] and r["attempts"] == 1 for r in records)
    assert all(set(r) >= {"key", "source", "status", "code", "message", "tags", "attempts"} for r in records)
    assert summary.ok == 40 and summary.exit_code == 0


async def test_rerun_does_nothing_twice(serve, creds, tmp_path):
    server = await serve()
    make_tree(tmp_path / "photos", 10)
    out = tmp_path / "out.jsonl"
    await run_batch(run_config(server, creds, [tmp_path / "photos"], out))
    second = await run_batch(run_config(server, creds, [tmp_path / "photos"], out))
    assert second.done == 0 and second.skipped_done == 10 and len(keys_of(out)) == 10


async def test_bad_items_get_one_clear_error_record_each_and_the_run_goes_on(serve, creds, tmp_path):
    server = await serve()
    good = write_jpeg(tmp_path / "in" / "good.jpg")
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    (tmp_path / "in" / "text.jpg").write_text("this is not an image")
    (tmp_path / "in" / "truncated.jpg").write_bytes(good.read_bytes()[:40])
    (tmp_path / "folder.jpg").mkdir()  # walked as a folder in a tree; named directly, an error
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(
        "\n".join(
            [
                json.dumps({"path": str(tmp_path / "in" / "missing.jpg")}),
                "{not json",
                json.dumps({"url": "ftp://example.com/a.jpg"}),
                json.dumps({"path": str(good)}),  # a duplicate of a directory entry: done once
                json.dumps({"path": str(tmp_path / "folder.jpg")}),
            ]
        )
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    summary = await run_batch(run_config(server, creds, [tmp_path / "in", manifest], out))
    by_key = {r["key"]: r for r in load_records(out)}
    assert len(by_key) == len(load_records(out)) == 8
    expect = {
        str(good): codes.OK,
        str(tmp_path / "in" / "empty.jpg"): codes.IMAGE_EMPTY,
        str(tmp_path / "in" / "text.jpg"): codes.IMAGE_FORMAT,
        str(tmp_path / "in" / "truncated.jpg"): codes.IMAGE_DECODE_FAILED,
        str(tmp_path / "folder.jpg"): codes.CLIENT_INPUT_ERROR,
        str(tmp_path / "in" / "missing.jpg"): codes.CLIENT_INPUT_ERROR,
        f"{manifest}:2": codes.CLIENT_BAD_MANIFEST_LINE,
        "ftp://example.com/a.jpg": codes.URL_FORMAT,
    }
    assert {k: r["code"] for k, r in by_key.items()} == expect
    for key, record in by_key.items():
        assert record["status"] == ("ok" if expect[key] == codes.OK else "error")
        assert record["message"]
    assert by_key[str(tmp_path / "in" / "missing.jpg")]["message"] == "file not found"
    assert summary.duplicates == 1 and summary.exit_code == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
async def test_unreadable_file(serve, creds, tmp_path):
    server = await serve()
    path = write_jpeg(tmp_path / "in" / "locked.jpg")
    path.chmod(0)
    out = tmp_path / "out.jsonl"
    await run_batch(run_config(server, creds, [path], out))
    (record,) = load_records(out)
    assert record["code"] == codes.CLIENT_INPUT_ERROR and record["message"] == "permission denied"


async def test_unreadable_file_as_root_too(serve, creds, tmp_path, monkeypatch):
    from batchtag.pipeline import payload

    server = await serve()
    path = write_jpeg(tmp_path / "in" / "locked.jpg")
    real_open = payload.open_regular_file

    def refusing_open(file, flags):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(file, flags)

    monkeypatch.setattr(payload, "open_regular_file", refusing_open)
    out = tmp_path / "out.jsonl"
    await run_batch(run_config(server, creds, [path], out))
    (record,) = load_records(out)
    assert record["code"] == codes.CLIENT_INPUT_ERROR and record["message"] == "permission denied"


async def test_interrupted_run_resumes_with_every_key_exactly_once(serve, creds, tmp_path):
    server = await serve(inject_latency_ms=20)
    paths = make_tree(tmp_path / "photos", 60)
    out = tmp_path / "out.jsonl"
    config = run_config(server, creds, [tmp_path / "photos"], out, concurrency=4)
    task = asyncio.create_task(run_batch(config))
    deadline = time.monotonic() + 60
    while not out.exists() or len(out.read_bytes().splitlines()) < 10:
        assert not task.done(), "the run ended before 10 records"
        assert time.monotonic() < deadline, "no 10 records within 60 s"
        await asyncio.sleep(0.01)
    task.cancel()
    first = await task
    assert first.interrupted and first.exit_code == 130
    written = len(keys_of(out))
    assert 10 <= written < 60
    second = await run_batch(run_config(server, creds, [tmp_path / "photos"], out))
    assert second.skipped_done == written
    assert sorted(keys_of(out)) == sorted(str(p) for p in paths)


async def test_torn_final_line_is_repaired_then_completed(serve, creds, tmp_path):
    server = await serve()
    paths = make_tree(tmp_path / "photos", 12)
    out = tmp_path / "out.jsonl"
    await run_batch(run_config(server, creds, [tmp_path / "photos"], out))
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])  # a crash mid-write
    summary = await run_batch(run_config(server, creds, [tmp_path / "photos"], out))
    assert summary.done == 7
    assert sorted(keys_of(out)) == sorted(str(p) for p in paths)


async def test_oversized_image_is_downscaled_not_refused(serve, creds, tmp_path):
    server = await serve(max_image_bytes=60_000)
    big = tmp_path / "big.jpg"
    big.write_bytes(noisy_jpeg((400, 300), seed=1))
    assert big.stat().st_size > 60_000
    out = tmp_path / "out.jsonl"
    await run_batch(run_config(server, creds, [big], out, max_image_bytes=60_000))
    (record,) = load_records(out)
    assert record["status"] == "ok"
    resized = record["resized"]
    assert resized["from_bytes"] == big.stat().st_size and resized["to_bytes"] <= 60_000
    assert resized["from_size"] == [400, 300] and resized["to_size"][0] < 400


async def test_transient_errors_are_redone_by_a_plain_rerun_permanent_ones_with_retry_errors(
    serve, creds, tmp_path
):
    flaky = await serve(inject_error_rate=1.0)
    paths = make_tree(tmp_path / "photos", 8)
    out = tmp_path / "out.jsonl"
    first = await run_batch(run_config(flaky, creds, [tmp_path / "photos"], out, retries=0))
    assert first.errors == 8 and first.exit_code == 1
    assert all(codes.is_transient(r["code"], r.get("http_status")) for r in load_records(out))
    healthy = await serve()
    plain_rerun = await run_batch(run_config(healthy, creds, [tmp_path / "photos"], out))
    assert plain_rerun.done == 8 and plain_rerun.ok == 8 and plain_rerun.exit_code == 0

    broken = tmp_path / "photos" / "late.jpg"
    broken.write_text("not an image")  # a permanent error (-1400), the file unchanged after
    assert (await run_batch(run_config(healthy, creds, [tmp_path / "photos"], out))).exit_code == 1
    plain_rerun = await run_batch(run_config(healthy, creds, [tmp_path / "photos"], out))
    assert plain_rerun.done == 0 and plain_rerun.previous_errors == 1
    assert plain_rerun.exit_code == 4  # --fail-on any (the default): OUT still holds an error
    plain_rerun.fail_on = "new"
    assert plain_rerun.exit_code == 0  # nothing new failed
    retried = await run_batch(run_config(healthy, creds, [tmp_path / "photos"], out, retry_errors=True))
    assert (retried.done, retried.errors) == (1, 1)  # done again, and still failing
    valid = {r.key: r for r in iter_valid_records(str(out))}
    assert sorted(valid) == sorted([*map(str, paths), str(broken)])
    assert [key for key, r in valid.items() if not r.ok] == [str(broken)]


async def test_transient_faults_are_retried_until_ok(serve, creds, tmp_path):
    server = await serve(inject_error_rate=0.3)
    make_tree(tmp_path / "photos", 30)
    out = tmp_path / "out.jsonl"
    summary = await run_batch(run_config(server, creds, [tmp_path / "photos"], out, retries=8))
    records = load_records(out)
    assert len(records) == 30
    assert not [r for r in records if r["status"] != "ok"]
    assert summary.attempts > 30  # some needed more than one go
    assert max(r["attempts"] for r in records) > 1


async def test_permanent_errors_are_not_retried(serve, creds, tmp_path):
    server = await serve()
    manifest = tmp_path / "urls.txt"  # loopback URLs: the server refuses them (permanent)
    manifest.write_text("".join(f"http://127.0.0.1:9/{name}.jpg\n" for name in "abc"))
    out = tmp_path / "out.jsonl"
    await run_batch(run_config(server, creds, [manifest], out))
    records = load_records(out)
    assert [r["code"] for r in records] == [codes.URL_FORMAT] * 3
    assert all(r["attempts"] == 1 for r in records)


async def test_refused_credentials_raise_instead_of_a_record_per_item(serve, creds, tmp_path):
    server = await serve()
    wrong = type(creds)(creds.appid, creds.secret_id, "wrong-secret")
    make_tree(tmp_path / "photos", 3)
    out = tmp_path / "out.jsonl"
    with pytest.raises(CredentialsRefused, match="code 14"):
        await run_batch(run_config(server, wrong, [tmp_path / "photos"], out))
    assert not out.exists()  # no records, and no empty OUT left behind


async def test_server_quota_slows_the_client_and_everything_still_ends_ok(serve, creds, tmp_path):
    server = await serve(qps_limit=30)
    make_tree(tmp_path / "photos", 90)
    out = tmp_path / "out.jsonl"
    summary = await run_batch(run_config(server, creds, [tmp_path / "photos"], out, qps=90, retries=10))
    assert summary.ok == 90
    assert summary.attempts > 90  # some were answered with code 15 and retried


async def test_summary_json_for_schedulers(serve, creds, tmp_path):
    server = await serve()
    make_tree(tmp_path / "photos", 5)
    (tmp_path / "photos" / "bad.jpg").write_text("nope")
    target = tmp_path / "summary.json"
    await run_batch(
        run_config(server, creds, [tmp_path / "photos"], tmp_path / "out.jsonl", summary_json=str(target))
    )
    data = json.loads(target.read_text())
    assert data["ok"] == 5 and data["errors"] == 1 and data["by_code"] == {"-1400": 1, "0": 5}
    assert data["exit_code"] == 1 and data["wall_s"] > 0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
async def test_image_decoder_accepts_what_payload_sends(tmp_path, fmt):
    """The client's pre-send check and the server's decoder agree on the API's formats: a
    body built by payload.py decodes on the server to the same pixels."""
    from batchtag.pipeline.payload import build_payload
    from batchtag.pipeline.sources import Item
    from batchtag.server.imaging import DecodeLimits, decode_base64, decode_image

    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(encode_image(fmt, size=(8, 6), color=(10, 200, 30)))
    payload = await build_payload(Item(str(path), "file", str(path)), "1000001", "")
    data = decode_base64(json.loads(payload.body)["image"], 1 << 20)
    image = decode_image(data, DecodeLimits(max_image_bytes=1 << 20, max_pixels=1 << 20))
    assert image.mode == "RGB" and image.size == (8, 6)
    red, green, blue = image.getpixel((4, 3))
    assert abs(red - 10) < 8 and abs(green - 200) < 8 and abs(blue - 30) < 8
