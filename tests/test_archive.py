"""Archives as they are: edited, moved, copied, HEIC, rotated, full of thumbnails.

Real trees on disk, a real server (in-process ``start_server`` or a ``batchtag serve``
subprocess); requests are counted on the server side (``/stats``), never from the
client's summary.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest
from PIL import Image

from batchtag import run_batch
from batchtag.config import ConfigError
from batchtag.orientation import ORIENTATION_TAG
from batchtag.pipeline.raw import largest_jpeg_preview
from batchtag.records import iter_valid_records
from tests.support import (
    CREDENTIALS,
    Spawner,
    http_get,
    line_count,
    requests_seen,
    run_cli,
    run_config,
    run_flags,
    write_credentials,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "photos"


def photo(path: Path, color=(200, 40, 40), size=(48, 32), fmt="JPEG", note: str | None = None) -> Path:
    """An image file with bytes unique to ``note`` (default: its path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    if fmt == "JPEG":
        image.save(path, fmt, comment=note or str(path))
    else:
        image.save(path, fmt)
    return path


async def requests(http, server) -> int:
    async with http.get(server.url + "/stats") as response:
        return requests_seen(await response.json())


def valid(out) -> dict[str, dict]:
    return {r.key: r.to_dict() for r in iter_valid_records(str(out))}


# --- change-aware reruns ----------------------------------------------------------------------


async def test_edited_file_is_tagged_again_and_a_touched_one_costs_nothing(serve, creds, http, tmp_path):
    server = await serve()
    root = tmp_path / "photos"
    a, b, c = (
        photo(root / f"{n}.jpg", color=col)
        for n, col in (("a", (200, 0, 0)), ("b", (0, 200, 0)), ("c", (0, 0, 200)))
    )
    out = tmp_path / "out.jsonl"
    await run_batch(run_config(server, creds, [root], out))
    assert await requests(http, server) == 3
    before = valid(out)
    assert before[str(a)]["file"]["size"] == a.stat().st_size
    assert before[str(a)]["file"]["mtime_ns"] == a.stat().st_mtime_ns
    assert len(before[str(a)]["file"]["xxh3_128"]) == 32
    assert before[str(a)]["settings"] == {"endpoint": server.url}

    photo(a, color=(250, 250, 0), size=(64, 40))  # edited in place: new size and mtime
    rerun = await run_batch(run_config(server, creds, [root], out))
    assert await requests(http, server) == 4
    assert rerun.changed == 1 and rerun.skipped_done == 2
    after = valid(out)
    assert len(after) == 3 and line_count(out) == 4
    assert after[str(a)]["file"]["size"] == a.stat().st_size != before[str(a)]["file"]["size"]
    assert after[str(a)]["tags"] != before[str(a)]["tags"]  # yellow now, not red
    assert after[str(b)] == before[str(b)]

    os.utime(b, ns=(time.time_ns(), b.stat().st_mtime_ns + 5_000_000_000))  # touched, same bytes
    touched = await run_batch(run_config(server, creds, [root], out))
    assert await requests(http, server) == 4
    assert touched.changed == 1 and touched.reused == 1
    record = valid(out)[str(b)]
    assert record["reused"] == str(b) and record["tags"] == before[str(b)]["tags"]
    assert record["file"]["mtime_ns"] == b.stat().st_mtime_ns
    assert (await run_batch(run_config(server, creds, [root], out))).done == 0
    del c


async def test_moved_root_costs_no_request(serve, creds, http, tmp_path):
    server = await serve()
    root = tmp_path / "photos"
    for i in range(6):
        photo(root / f"album{i % 2}" / f"img{i}.jpg", color=(i * 40, 100, 200 - i * 30))
    out = tmp_path / "out.jsonl"
    await run_batch(run_config(server, creds, [root], out))
    assert await requests(http, server) == 6
    old = valid(out)
    moved = tmp_path / "nas" / "photos"
    moved.parent.mkdir()
    root.rename(moved)
    summary = await run_batch(run_config(server, creds, [moved], out))
    assert await requests(http, server) == 6
    assert summary.done == 6 and summary.reused == 6 and summary.attempts == 0
    now = valid(out)
    for old_key, record in old.items():
        new_key = old_key.replace(str(root), str(moved))
        assert now[new_key]["reused"] == old_key and now[new_key]["tags"] == record["tags"]


async def test_identical_bytes_are_sent_once_within_a_run_and_across_runs(serve, creds, http, tmp_path):
    server = await serve(inject_latency_ms=30)  # the first copy is still in flight when the others come
    root = tmp_path / "photos"
    original = photo(root / "a.jpg", color=(10, 200, 90))
    for album in ("album1", "album2", "album3"):
        (root / album).mkdir()
        shutil.copy(original, root / album / "a.jpg")
    photo(root / "b.jpg", color=(90, 10, 200))
    out = tmp_path / "out.jsonl"
    summary = await run_batch(run_config(server, creds, [root], out, concurrency=8))
    assert await requests(http, server) == 2
    records = valid(out)
    same = [str(original), *(str(root / album / "a.jpg") for album in ("album1", "album2", "album3"))]
    # Preparers run side by side: whichever copy is read first is sent, the others reuse it.
    (leader,) = [records[k] for k in same if "reused" not in records[k]]
    assert leader["attempts"] == 1
    copies = [records[k] for k in same if k != leader["key"]]
    assert all(
        c["reused"] == leader["key"] and c["tags"] == leader["tags"] and c["attempts"] == 0 for c in copies
    )
    assert summary.reused == 3
    shutil.copy(original, root / "late-copy.jpg")
    again = await run_batch(run_config(server, creds, [root], out))
    assert await requests(http, server) == 2 and again.reused == 1
    assert valid(out)[str(root / "late-copy.jpg")]["reused"] == leader["key"]


# --- formats ----------------------------------------------------------------------------------


def tiff_with_preview(path: Path, preview: bytes, big_endian: bool = False) -> Path:
    """A TIFF-based RAW stand-in: IFD0 (a 1x1 strip) and a SubIFD holding a JPEG preview
    through JPEGInterchangeFormat, as NEF and DNG do."""
    e = ">" if big_endian else "<"
    header = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(e + "I", 8)
    ifd0_at, sub_at = 8, 8 + 2 + 3 * 12 + 4
    data_at = sub_at + 2 + 2 * 12 + 4
    ifd0 = struct.pack(e + "H", 3)
    ifd0 += struct.pack(e + "HHII", 0x0100, 4, 1, 1)  # width
    ifd0 += struct.pack(e + "HHII", 0x0101, 4, 1, 1)  # height
    ifd0 += struct.pack(e + "HHII", 0x014A, 4, 1, sub_at)  # SubIFDs
    ifd0 += struct.pack(e + "I", 0)
    sub = struct.pack(e + "H", 2)
    sub += struct.pack(e + "HHII", 0x0201, 4, 1, data_at)
    sub += struct.pack(e + "HHII", 0x0202, 4, 1, len(preview))
    sub += struct.pack(e + "I", 0)
    assert len(header) == ifd0_at and len(header + ifd0) == sub_at
    path.write_bytes(header + ifd0 + sub + preview)
    return path


def jpeg(color, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def test_raw_preview_is_found_in_either_byte_order(tmp_path):
    preview = jpeg((0, 0, 255), (120, 80))
    for big in (False, True):
        path = tiff_with_preview(tmp_path / f"x{big}.nef", preview, big_endian=big)
        assert largest_jpeg_preview(path.read_bytes()) == preview
    assert largest_jpeg_preview(b"II*\x00" + b"\xff" * 40) is None
    assert largest_jpeg_preview(b"not a tiff at all") is None


async def test_heic_webp_tiff_and_raw_are_converted_before_sending(serve, creds, http, tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    server = await serve()
    root = tmp_path / "photos"
    red, green, blue, grey = (220, 20, 20), (20, 200, 40), (30, 40, 220), (128, 128, 128)
    photo(root / "phone.heic", red, fmt="HEIF")
    photo(root / "web.webp", green, fmt="WEBP")
    photo(root / "scan.tiff", blue, fmt="TIFF")
    tiff_with_preview(root / "camera.nef", jpeg(grey, (96, 64)))
    (root / "broken.cr2").write_bytes(b"II*\x00" + b"\x00" * 64)
    out = tmp_path / "out.jsonl"
    summary = await run_batch(run_config(server, creds, [root], out))
    assert await requests(http, server) == 4  # the RAW without a preview costs nothing
    records = valid(out)
    heic, webp, tiff = (records[str(root / n)] for n in ("phone.heic", "web.webp", "scan.tiff"))
    assert heic["converted"] == {"from": "HEIF", "to": "JPEG"} and heic["status"] == "ok"
    assert webp["converted"]["from"] == "WEBP" and tiff["converted"]["from"] == "TIFF"
    assert records[str(root / "camera.nef")]["converted"]["from"] == "RAW"
    assert (
        records[str(root / "broken.cr2")]["code"] == -1400
        and records[str(root / "broken.cr2")]["attempts"] == 0
    )
    assert summary.converted == 4
    # The colour tagger saw the real pixels: each file's tags are those of the same JPEG.
    references = tmp_path / "ref"
    for name, color in (("red", red), ("green", green), ("blue", blue)):
        photo(references / f"{name}.jpg", color)
    await run_batch(run_config(server, creds, [references], tmp_path / "ref.jsonl"))
    ref = valid(tmp_path / "ref.jsonl")
    for record, name in ((heic, "red"), (webp, "green"), (tiff, "blue")):
        top = record["tags"][0]["tag_name"]
        assert top == ref[str(references / f"{name}.jpg")]["tags"][0]["tag_name"], (record, name)


# --- orientation, with the real model ---------------------------------------------------------


def rotated_with_tag(upright_path: Path, target: Path, orientation: int = 6) -> Path:
    """The upright photo's pixels stored turned, with the EXIF tag that says so (as phones do):
    orientation 6 means "rotate 90 degrees clockwise to view"."""
    with Image.open(upright_path) as image:
        stored = image.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    target.parent.mkdir(parents=True, exist_ok=True)
    stored.save(target, "JPEG", quality=95, exif=exif.tobytes())
    return target


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("model")
    spawner = Spawner(workdir)
    creds = write_credentials(workdir / "creds.json")
    proc, url = spawner.serve(creds, "--tagger", "model", "--lang", "en")
    yield url
    spawner.close()
    del proc


def top_tags(out: Path) -> dict[str, tuple[str, int]]:
    return {
        Path(r.key).name: (r.tags[0]["tag_name"], r.tags[0]["tag_confidence"])
        for r in iter_valid_records(str(out))
    }


def test_rotated_photo_is_sent_upright_and_scores_like_the_upright_one(model_server, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(EXAMPLES / "coffee.jpg", root / "upright.jpg")
    rotated_with_tag(EXAMPLES / "coffee.jpg", root / "rotated.jpg")
    with Image.open(root / "rotated.jpg") as image:  # control: the same pixels, no tag
        image.save(root / "sideways.jpg", "JPEG", quality=95)
    out = tmp_path / "out.jsonl"
    result = run_cli("run", root, "-o", out, *run_flags(model_server), "--no-progress")
    assert result.returncode == 0, result.stderr
    tops = top_tags(out)
    records = valid(out)
    assert records[str(root / "rotated.jpg")]["uprighted"] == {"orientation": 6}
    assert "uprighted" not in records[str(root / "upright.jpg")]
    assert tops["rotated.jpg"][0] == tops["upright.jpg"][0] == "coffee"
    assert abs(tops["rotated.jpg"][1] - tops["upright.jpg"][1]) <= 3
    assert tops["sideways.jpg"] != tops["upright.jpg"]  # without the tag the model sees it turned


def test_serve_honours_the_orientation_tag_for_other_clients(model_server, tmp_path):
    """A client that sends the turned bytes as they are (a manifest keeps nothing from being
    read, so send them raw through a signed request) still gets the upright tags."""
    import base64

    from batchtag.api import DETECT_PATH
    from batchtag.signing import sign

    rotated = rotated_with_tag(EXAMPLES / "coffee.jpg", tmp_path / "rotated.jpg").read_bytes()
    upright = (EXAMPLES / "coffee.jpg").read_bytes()
    creds = CREDENTIALS

    def detect(data: bytes) -> dict:
        import urllib.request

        body = json.dumps({"appid": creds.appid, "image": base64.b64encode(data).decode()}).encode()
        request = urllib.request.Request(
            model_server + DETECT_PATH,
            data=body,
            headers={"Authorization": sign(creds, ""), "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    turned, straight = detect(rotated), detect(upright)
    assert turned["code"] == 0 and straight["code"] == 0
    assert turned["tags"][0]["tag_name"] == straight["tags"][0]["tag_name"] == "coffee"
    assert abs(turned["tags"][0]["tag_confidence"] - straight["tags"][0]["tag_confidence"]) <= 3


# --- excludes -----------------------------------------------------------------------------------


def test_walk_skips_thumbnails_and_hidden_and_counts_what_it_left_out(spawner, tmp_path):
    root = tmp_path / "photos"
    photo(root / "a.jpg")
    photo(root / "2019" / "b.jpg")
    photo(root / "@eaDir" / "a.jpg" / "SYNOPHOTO_THUMB_M.jpg")
    photo(root / "2019" / "@eaDir" / "b.jpg" / "SYNOPHOTO_THUMB_XL.jpg")
    photo(root / ".thumbnails" / "normal" / "t.png", fmt="PNG")
    photo(root / ".AppleDouble" / "a.jpg")
    photo(root / "__MACOSX" / "._a.jpg")
    photo(root / ".hidden.jpg")
    photo(root / ".cache" / "x.jpg")
    photo(root / "drafts" / "d.jpg")
    photo(root / "2019" / "c.png", fmt="PNG")
    (root / "notes.txt").write_text("not a photo")
    (root / "clip.mov").write_bytes(b"\x00" * 10)
    (root / "2019" / "clip2.MOV").write_bytes(b"\x00" * 10)
    _, url = spawner.serve(write_credentials(tmp_path / "creds.json"))
    out, summary_path = tmp_path / "out.jsonl", tmp_path / "summary.json"
    args = ["run", root, "-o", out, *run_flags(url), "--no-progress", "--summary-json", summary_path]
    result = run_cli(*args, "--exclude", "drafts", "--exclude", "*.png")
    assert result.returncode == 0, result.stderr
    assert sorted(valid(out)) == [str(root / "2019" / "b.jpg"), str(root / "a.jpg")]
    assert requests_seen(json.loads(http_get(url + "/stats")[1])) == 2
    left_out = json.loads(summary_path.read_text())["left_out"]
    assert left_out["files"] == {
        "excluded": {".png": 1},
        "hidden": {".jpg": 1},
        "unsupported format": {".mov": 2, ".txt": 1},
    }
    assert left_out["folders"] == {"excluded": 1, "hidden": 1, "system folder": 5}
    assert "left out" in result.stderr and "unsupported format: .mov 2, .txt 1" in result.stderr

    everything = run_cli(*args, "--include-hidden")
    assert everything.returncode == 0, everything.stderr
    keys = set(valid(out))
    assert str(root / "@eaDir" / "a.jpg" / "SYNOPHOTO_THUMB_M.jpg") in keys
    assert str(root / ".hidden.jpg") in keys and str(root / "drafts" / "d.jpg") in keys
    # __MACOSX/._a.jpg is an AppleDouble resource fork, never a photo: a system file even now.
    assert str(root / "__MACOSX" / "._a.jpg") not in keys and len(keys) == 10
    assert json.loads(summary_path.read_text())["left_out"]["files"]["system files"] == {".jpg": 1}


# --- settings ---------------------------------------------------------------------------------


def test_other_language_is_refused_unless_retag(tmp_path):
    root = tmp_path / "photos"
    photo(root / "a.jpg", (220, 20, 20))
    photo(root / "b.jpg", (20, 20, 220))
    out = tmp_path / "out.jsonl"
    base = ["run", root, "-o", out, "--tagger", "color", "--no-progress"]
    assert run_cli(*base, "--lang", "en").returncode == 0
    english = out.read_bytes()
    refused = run_cli(*base, "--lang", "zh")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "lang en" in refused.stderr and "--retag" in refused.stderr
    assert "Traceback" not in refused.stderr and out.read_bytes() == english
    redone = run_cli(*base, "--lang", "zh", "--retag", "--summary-json", tmp_path / "s.json")
    assert redone.returncode == 0, redone.stderr
    assert json.loads((tmp_path / "s.json").read_text())["retagged"] == 2
    records = valid(out)
    assert len(records) == 2 and all(r["settings"]["lang"] == "zh" for r in records.values())
    assert all(not r["tags"][0]["tag_name"].isascii() for r in records.values())
    assert run_cli(*base, "--lang", "zh").returncode == 0  # nothing mixed any more


def test_other_model_stages_are_a_settings_change(tmp_path):
    """--stages (and the float classifier) change the tags, so records name them; the default
    leaves them out, so an OUT made before they were named still resumes."""
    root = tmp_path / "photos"
    photo(root / "a.jpg", (220, 20, 20))
    out = tmp_path / "out.jsonl"
    base = ["run", root, "-o", out, "--tagger", "model", "--no-progress"]
    assert run_cli(*base).returncode == 0
    made_by_default = out.read_bytes()
    assert "model" not in next(iter(valid(out).values()))["settings"]
    refused = run_cli(*base, "--stages", "classifier,blazeface")
    assert refused.returncode == 2 and "--retag" in refused.stderr and "Traceback" not in refused.stderr
    assert out.read_bytes() == made_by_default
    assert run_cli(*base, "--stages", "classifier,blazeface", "--retag").returncode == 0
    (record,) = valid(out).values()
    assert record["settings"]["model"] == "stages classifier,blazeface"
    assert run_cli(*base, "--stages", "blazeface,classifier").returncode == 0  # the same choice
    assert run_cli(*base, "--stages", "classifier,detector").returncode == 2  # the default again
    assert run_cli(*base, "--float-classifier").returncode == 2


async def test_other_endpoint_is_refused(serve, creds, tmp_path):
    first, second = await serve(), await serve()
    photo(tmp_path / "photos" / "a.jpg")
    out = tmp_path / "out.jsonl"
    await run_batch(run_config(first, creds, [tmp_path / "photos"], out))
    with pytest.raises(ConfigError, match="--retag"):
        await run_batch(run_config(second, creds, [tmp_path / "photos"], out))
    summary = await run_batch(run_config(second, creds, [tmp_path / "photos"], out, retag=True))
    assert (
        summary.retagged == 1
        and valid(out)[str(tmp_path / "photos" / "a.jpg")]["settings"]["endpoint"] == second.url
    )


# --- crash in the middle of a change-aware rerun -----------------------------------------------


def test_sigkill_during_a_change_aware_rerun_leaves_one_valid_record_per_key(spawner, tmp_path):
    root = tmp_path / "photos"
    paths = [photo(root / f"d{i % 4}" / f"p{i:03}.jpg", color=(i * 3 % 256, 90, 150)) for i in range(80)]
    _, url = spawner.serve(write_credentials(tmp_path / "creds.json"), "--inject-latency-ms", "20")
    out = tmp_path / "out.jsonl"
    args = ["run", root, "-o", out, *run_flags(url), "--no-progress", "--concurrency", "4"]
    assert run_cli(*args).returncode == 0
    assert line_count(out) == 80
    for i, path in enumerate(paths):  # every photo edited: all 80 are to be done again
        photo(path, color=(90, i * 3 % 256, 40), size=(50, 34))
    proc = spawner.start(*args, name="rerun")
    deadline = time.monotonic() + 60
    while line_count(out) < 80 + 10 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.popen.send_signal(signal.SIGKILL)
    proc.wait(timeout=15)
    assert 80 < line_count(out) < 160, "killed before or after the change-aware rerun"
    records = list(iter_valid_records(str(out)))
    assert sorted(r.key for r in records) == sorted(map(str, paths))  # every key exactly once
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    final = valid(out)
    assert len(final) == 80
    for path in paths:
        facts = final[str(path)]["file"]
        assert (facts["size"], facts["mtime_ns"]) == (path.stat().st_size, path.stat().st_mtime_ns)
