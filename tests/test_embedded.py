"""The embedded mode (no endpoint) tags in process, without HTTP: it must answer exactly what
the HTTP server answers for the same inputs, good and bad, end to end through run_batch."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

from batchtag import RunConfig, codes, run_batch
from batchtag.config import LOCAL
from batchtag.records import load_records
from tests.support import run_cli, run_config


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def mixed_inputs(root: Path) -> list[Path]:
    """Good images of several formats and sizes, and bad ones each API stage refuses."""
    root.mkdir(parents=True)
    for i, (fmt, size) in enumerate([("JPEG", (640, 480)), ("PNG", (300, 200)), ("BMP", (50, 70))]):
        Image.new("RGB", size, (40 * i, 200 - 30 * i, 90)).save(root / f"good{i}.{fmt.lower()}", fmt)
    buffer = io.BytesIO()
    Image.effect_noise((400, 300), 60).convert("RGB").save(buffer, "JPEG")
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    (root / "bomb.png").write_bytes(png_claiming(20_000, 20_000))
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_bytes(b"not an image at all")
    manifest = root.parent / "manifest.txt"
    urls = ["http://127.0.0.1:9/private.jpg", "ftp://example.invalid/x.jpg"]
    manifest.write_text("\n".join([*map(str, sorted(root.iterdir())), *urls]) + "\n")
    return [manifest]


def outcome(out: Path) -> dict[str, tuple[str, int, list[str]]]:
    return {r["key"]: (r["status"], r["code"], [t["tag_name"] for t in r["tags"]]) for r in load_records(out)}


async def test_embedded_answers_exactly_what_the_http_server_answers(serve, creds, tmp_path):
    sources = mixed_inputs(tmp_path / "in")
    server = await serve()  # color tagger, like the embedded run below
    over_http = tmp_path / "http.jsonl"
    await run_batch(run_config(server, creds, sources, over_http))
    embedded = tmp_path / "embedded.jsonl"
    summary = await run_batch(
        RunConfig(
            sources=[str(s) for s in sources],
            out=str(embedded),
            endpoint=LOCAL,
            tagger="color",
            lang="zh",
            progress=False,
        )
    )
    expected = outcome(over_http)
    assert outcome(embedded) == expected
    codes_seen = {code for _, code, _ in expected.values()}
    # The comparison covers success and a refusal from every stage: client checks, the
    # header's pixel count, the decoder, the url guard.
    assert {codes.OK, codes.IMAGE_TOO_LARGE, codes.IMAGE_DECODE_FAILED, codes.IMAGE_EMPTY} <= codes_seen
    assert summary.ok == sum(status == "ok" for status, _, _ in expected.values()) == 3
    assert all(tags for status, _, tags in expected.values() if status == "ok")


def test_stages_and_no_faces_reach_the_embedded_tagger(tmp_path):
    """`batchtag run --stages ... [--no-faces]` (the bench's same-model comparisons) reach the
    embedded tagger: the default's person box, BlazeFace's face, and neither."""
    photo = Path(__file__).resolve().parent.parent / "examples" / "photos" / "grace_hopper.jpg"
    tags = {}
    blazeface = ("--stages", "classifier,blazeface", "--float-classifier")
    runs = {
        "default": (),
        "blazeface": blazeface,
        "blazeface, no-faces": (*blazeface, "--no-faces"),
        "classifier": ("--stages", "classifier", "--float-classifier"),
    }
    for label, flags in runs.items():
        out = tmp_path / f"{label}.jsonl"
        done = run_cli(
            "run", photo, "-o", out, "--lang", "en", "--no-progress", *flags, env={"BATCHTAG_ENDPOINT": ""}
        )
        assert done.returncode == 0, done.stderr
        (record,) = load_records(out)
        tags[label] = {t["tag_name"] for t in record["tags"]}
    assert "portrait" in tags["default"]  # the detector's person box fills the frame
    assert "portrait" in tags["blazeface"]  # one large face
    assert "portrait" not in tags["blazeface, no-faces"] and "portrait" not in tags["classifier"]
    assert tags["classifier"]  # the classifier's own tags are still there
