"""Payloads: what is read, refused and sent for one item, before any request is spent."""

import base64
import io
import json

import pytest
from PIL import Image

from batchtag import codes
from batchtag.pipeline.payload import (
    INLINE_ENCODE_BYTES,
    InputError,
    body_bytes,
    build_payload,
    image_payload,
    read_file,
    shrink_to_fit,
)
from batchtag.pipeline.sources import Item
from tests.support import encode_image, noisy_jpeg


def file_item(path) -> Item:
    return Item(str(path), "file", str(path))


def test_body_is_the_api_json_with_and_without_bucket():
    assert json.loads(body_bytes("1000001", "", "image", b"QUJD")) == {"appid": "1000001", "image": "QUJD"}
    with_bucket = json.loads(body_bytes("1000001", "b1", "url", b"http://x/a.jpg"))
    assert with_bucket == {"appid": "1000001", "bucket": "b1", "url": "http://x/a.jpg"}


async def test_file_payload_carries_the_exact_bytes_base64_encoded(tmp_path):
    image = encode_image("PNG")
    (tmp_path / "a.png").write_bytes(image)
    payload = await build_payload(file_item(tmp_path / "a.png"), "1000001", "")
    assert base64.b64decode(json.loads(payload.body)["image"]) == image
    assert payload.notes == {}


async def test_big_file_encoded_off_the_loop_gives_the_same_body(tmp_path):
    image = noisy_jpeg((600, 400))
    assert len(image) > INLINE_ENCODE_BYTES
    (tmp_path / "big.jpg").write_bytes(image)
    payload = await build_payload(file_item(tmp_path / "big.jpg"), "1000001", "")
    assert payload.body == body_bytes("1000001", "", "image", base64.b64encode(image))


async def test_oversized_image_is_shrunk_under_the_limit_and_noted(tmp_path):
    image = noisy_jpeg((600, 400))
    limit = len(image) // 3
    (tmp_path / "huge.jpg").write_bytes(image)
    payload = await build_payload(file_item(tmp_path / "huge.jpg"), "1000001", "", max_image_bytes=limit)
    sent = base64.b64decode(json.loads(payload.body)["image"])
    assert len(sent) <= limit
    note = payload.notes["resized"]
    assert note["from_bytes"] == len(image) and note["to_bytes"] == len(sent)
    assert note["from_size"] == [600, 400]
    with Image.open(io.BytesIO(sent)) as shrunk:
        assert shrunk.format == "JPEG" and list(shrunk.size) == note["to_size"]


async def test_url_payload_is_escaped_json_and_a_bad_url_costs_no_request():
    url = 'https://example.com/a "b".jpg'
    payload = await build_payload(Item(url, "url", url), "1000001", "bkt")
    assert json.loads(payload.body) == {"appid": "1000001", "bucket": "bkt", "url": url}
    with pytest.raises(InputError) as refused:
        await build_payload(Item("ftp://x/a.jpg", "url", "ftp://x/a.jpg"), "1000001", "")
    assert refused.value.code == codes.URL_FORMAT


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.jpg", "file not found"), ("folder", "is a directory"), ("nul\0.jpg", "invalid path")],
)
async def test_unreadable_files_are_input_errors(tmp_path, name, message):
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match=message) as refused:
        await read_file(str(tmp_path / name))
    assert refused.value.code == codes.CLIENT_INPUT_ERROR


@pytest.mark.parametrize(
    ("data", "code"),
    [(b"", codes.IMAGE_EMPTY), (encode_image("GIF"), codes.IMAGE_FORMAT), (b"hello", codes.IMAGE_FORMAT)],
)
async def test_bytes_the_api_would_refuse_are_caught_before_sending(data, code):
    """Not an image the API takes nor one batchtag converts (GIF, text): no request."""
    with pytest.raises(InputError) as refused:
        await image_payload(data, "x.jpg", "1000001", "")
    assert refused.value.code == code


async def test_accepted_formats_are_sent_byte_for_byte():
    for fmt in ("JPEG", "PNG", "BMP"):
        data = encode_image(fmt)
        payload = await image_payload(data, "x", "1000001", "")
        assert base64.b64decode(json.loads(payload.body)["image"]) == data and payload.notes == {}


def test_an_oversized_file_that_cannot_be_decoded_is_a_decode_error():
    header_only = encode_image()[:40] + b"\0" * 4000
    with pytest.raises(InputError) as refused:
        shrink_to_fit(header_only, 1000)
    assert refused.value.code == codes.IMAGE_DECODE_FAILED


async def test_without_a_body_the_payload_carries_the_raw_source(tmp_path):
    """The embedded transport's payload: the file's own bytes (no base64, no JSON), the url as is."""
    image = encode_image("PNG")
    (tmp_path / "a.png").write_bytes(image)
    payload = await build_payload(file_item(tmp_path / "a.png"), "1000001", "", body=False)
    assert (payload.body, payload.image, payload.url) == (b"", image, None)
    url = "https://example.com/a b.jpg"
    payload = await build_payload(Item(url, "url", url), "1000001", "", body=False)
    assert (payload.body, payload.image, payload.url) == (b"", None, url)
    with pytest.raises(InputError) as refused:
        await build_payload(Item("ftp://x/a.jpg", "url", "ftp://x/a.jpg"), "1000001", "", body=False)
    assert refused.value.code == codes.URL_FORMAT


async def test_files_read_together_come_back_in_order_each_with_its_own_outcome(tmp_path):
    from batchtag.pipeline.payload import FileRead, read_images

    first, second = encode_image("JPEG", color=(1, 2, 3)), encode_image("PNG")
    (tmp_path / "a.jpg").write_bytes(first)
    (tmp_path / "b.png").write_bytes(second)
    items = [Item.with_stat(file_item(tmp_path / name)) for name in ("a.jpg", "missing.jpg", "b.png")]
    reads = await read_images(items)
    assert [type(r) for r in reads] == [FileRead, InputError, FileRead]
    assert reads[0].data == first and reads[2].data == second
    assert reads[1].message == "file not found"
    assert reads[0].facts.size == len(first) and reads[0].facts.xxh3_128 != reads[2].facts.xxh3_128


def _jpeg(exif: bytes | None = None, comment: bytes | None = None) -> bytes:
    out = io.BytesIO()
    options = {"exif": exif} if exif is not None else {}
    if comment is not None:
        options["comment"] = comment
    Image.new("RGB", (16, 16), (200, 30, 30)).save(out, "JPEG", **options)
    return out.getvalue()


def test_exif_is_found_by_walking_the_jpeg_segments():
    from batchtag.pipeline.formats import jpeg_has_exif, may_be_turned

    turned = Image.Exif()
    turned[0x0112] = 6
    assert jpeg_has_exif(_jpeg(turned.tobytes()))
    assert not jpeg_has_exif(_jpeg())
    assert not jpeg_has_exif(_jpeg(comment=b"Exif\x00\x00 in a comment is not EXIF"))
    assert jpeg_has_exif(b"\xff\xd8\xff\xe1\x00")  # cut short: let Pillow judge
    assert jpeg_has_exif(b"\xff\xd8\x00\x00\x00\x00")  # not a marker where one must be
    assert may_be_turned(_jpeg(turned.tobytes())) and not may_be_turned(_jpeg())


def test_a_file_longer_than_its_stat_size_is_read_to_the_end_and_capped():
    """/proc files say size 0 and hold more, like a file that grows while it is read."""
    import os

    from batchtag.pipeline.payload import read_regular

    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == 0
        assert b"VmRSS" in read_regular(fd, 1 << 20)
        os.lseek(fd, 0, os.SEEK_SET)
        with pytest.raises(InputError, match="file too large"):
            read_regular(fd, 10)
    finally:
        os.close(fd)


async def test_small_files_sized_by_the_walker_are_read_without_a_thread_hop(tmp_path, monkeypatch):
    """Each thread hop of a read costs GIL hand-overs (futex calls) worth a fifth of the
    client's CPU per request at 4 KB: a small batch is read on the loop, anything else not."""
    from batchtag.pipeline import payload
    from batchtag.pipeline.payload import INLINE_READ_BYTES, FileRead, read_images, reads_inline

    image = encode_image("JPEG", color=(4, 5, 6))
    (tmp_path / "a.jpg").write_bytes(image)
    small = [Item.with_stat(file_item(tmp_path / "a.jpg"))]
    unsized = [file_item(tmp_path / "a.jpg")]
    large = [Item(str(tmp_path / "a.jpg"), "file", str(tmp_path / "a.jpg"), size=INLINE_READ_BYTES + 1)]
    assert reads_inline(small) and not reads_inline(unsized) and not reads_inline(large)
    hops: list[object] = []
    real_to_thread = payload.asyncio.to_thread

    async def counting_to_thread(func, /, *args):
        hops.append(func)
        return await real_to_thread(func, *args)

    monkeypatch.setattr(payload.asyncio, "to_thread", counting_to_thread)
    reads = await read_images(small)
    assert hops == [] and isinstance(reads[0], FileRead) and reads[0].data == image
    reads = await read_images(unsized)
    assert len(hops) == 1 and isinstance(reads[0], FileRead) and reads[0].data == image
