"""Sources: stable streaming walk, manifests, and bad entries that become error items."""

import io
import os
import re

import pytest

from batchtag import codes
from batchtag.keyset import fingerprint
from batchtag.pipeline import sources
from batchtag.pipeline.sources import (
    SourceError,
    UrlChunk,
    check_source,
    iter_chunks,
    iter_items,
    read_manifest,
    read_stdin,
    read_txt_chunks,
    url_problem,
    walk_directory,
)


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_walk_is_sorted_recursive_and_picks_images_by_extension(tmp_path):
    for name in ["b/2.JPG", "b/1.png", "a.jpeg", "c/d/e.bmp", "notes.txt", "z.gif", "b/0.Jpg"]:
        touch(tmp_path / name)
    keys = [item.key for item in walk_directory(str(tmp_path))]
    expected = ["a.jpeg", "b/0.Jpg", "b/1.png", "b/2.JPG", "c/d/e.bmp"]
    assert keys == [str(tmp_path / name) for name in expected]


def test_walk_is_lazy(tmp_path):
    for i in range(50):
        touch(tmp_path / f"d{i:02}" / "x.jpg")
    walker = walk_directory(str(tmp_path))
    first = next(walker)
    assert first.key.endswith("d00/x.jpg")  # produced before the rest of the tree is read


def test_symlink_loop_is_skipped_with_a_warning(tmp_path):
    touch(tmp_path / "a" / "1.jpg")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    warnings = []
    keys = [item.key for item in walk_directory(str(tmp_path), warnings.append)]
    assert keys == [str(tmp_path / "a" / "1.jpg")]
    assert any("symlink loop" in w for w in warnings)


def test_unreadable_directory_becomes_an_error_item(tmp_path, monkeypatch):
    touch(tmp_path / "ok" / "1.jpg")
    (tmp_path / "secret").mkdir()
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("secret"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items = list(walk_directory(str(tmp_path)))
    assert [i.key for i in items] == [str(tmp_path / "ok" / "1.jpg"), str(tmp_path / "secret")]
    assert items[1].error_code == codes.CLIENT_INPUT_ERROR and "Permission denied" in items[1].error


def test_txt_manifest_skips_blanks_and_comments_and_resolves_relative_paths(tmp_path):
    manifest = tmp_path / "m" / "list.txt"
    touch(manifest, b"# header\n\nhttp://example.com/a.jpg\n  pics/b.jpg  \n/abs/c.png\n")
    items = list(iter_items([str(manifest)]))
    assert [(i.kind, i.key) for i in items] == [
        ("url", "http://example.com/a.jpg"),
        ("file", str(tmp_path / "m" / "pics" / "b.jpg")),
        ("file", "/abs/c.png"),
    ]


def test_csv_manifest_url_or_path_columns_and_bad_rows(tmp_path):
    manifest = touch(tmp_path / "m.csv", b"id,URL\n1,https://x.test/1.jpg\n2,\n3,https://x.test/3.jpg\n")
    items = list(iter_items([str(manifest)]))
    assert [i.key for i in items] == ["https://x.test/1.jpg", f"{manifest}:3", "https://x.test/3.jpg"]
    assert items[1].error_code == codes.CLIENT_BAD_MANIFEST_LINE


def test_csv_without_url_or_path_column_is_a_usage_error(tmp_path):
    manifest = touch(tmp_path / "m.csv", b"id,name\n1,a\n")
    with pytest.raises(SourceError, match="'url' or 'path' column"):
        check_source(str(manifest))


def test_jsonl_manifest_with_malformed_lines(tmp_path):
    manifest = touch(
        tmp_path / "m.jsonl",
        b'{"url": "https://x.test/a.jpg"}\n\nnot json\n{"path": "b.jpg"}\n[1,2]\n{"url": 5}\n',
    )
    items = list(iter_items([str(manifest)]))
    assert [i.key for i in items] == [
        "https://x.test/a.jpg",
        f"{manifest}:3",
        str(tmp_path / "b.jpg"),
        f"{manifest}:5",
        f"{manifest}:6",
    ]
    assert [i.error_code for i in items] == [
        None,
        codes.CLIENT_BAD_MANIFEST_LINE,
        None,
        codes.CLIENT_BAD_MANIFEST_LINE,
        codes.CLIENT_BAD_MANIFEST_LINE,
    ]


@pytest.mark.parametrize(
    "url",
    ["ftp://x.test/a.jpg", "javascript:alert(1)", "http://", "https:///nohost.jpg", "file:///etc/passwd"],
)
def test_invalid_urls_are_url_items_with_a_problem(tmp_path, url):
    manifest = touch(tmp_path / "m.txt", url.encode() + b"\n")
    (item,) = iter_items([str(manifest)])
    assert item.kind == "url" and item.key == url
    assert url_problem(url).startswith("invalid URL")  # the worker records it as -1505


def test_good_urls_have_no_problem():
    assert url_problem("https://example.com/a.jpg?x=1") is None


def test_stdin_manifest():
    items = list(read_stdin(io.StringIO("https://x.test/a.jpg\n# c\n\nhttps://x.test/b.jpg\n")))
    assert [i.key for i in items] == ["https://x.test/a.jpg", "https://x.test/b.jpg"]


def test_keys_are_normalised_absolute_paths(tmp_path, monkeypatch):
    touch(tmp_path / "p" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    assert (
        [i.key for i in iter_items(["p"])]
        == [i.key for i in iter_items(["./p/"])]
        == [str(tmp_path / "p/a.jpg")]
    )


@pytest.mark.parametrize("name", ["missing-dir", "file.gif"])
def test_unusable_source_arguments_are_usage_errors(tmp_path, name):
    if name.endswith(".gif"):
        touch(tmp_path / name)
    with pytest.raises(SourceError):
        check_source(str(tmp_path / name))


# --- .txt manifests a block at a time: the same items as line by line ------------------------

URLS = [f"https://x.example/{i}.jpg" for i in range(30)]
ODD_MANIFESTS = {
    "plain": "\n".join(URLS) + "\n",
    "crlf, no last newline": "\r\n".join(URLS),
    "cr alone": "\r".join(URLS) + "\r",
    "blanks, comments, padding": "# head\n\n" + "\n".join(f" {u}\t" for u in URLS) + "\n\x1c\n#x\n",
    "duplicates": "\n".join(URLS + URLS[:5]) + "\n",
    "odd characters": "\n".join([*URLS, 'http://x.example/a b{c}"d"\\e.jpg', "HTTP://X.EXAMPLE/UP.JPG"]),
    "paths among urls": "\n".join([*URLS[:10], "pics/a.jpg", "/abs/b.png", *URLS[10:]]) + "\n",
    "non-ascii": "\n".join([*URLS, "https://x.example/路径/ü.jpg", "\ufeffhttps://x.example/bom.jpg"]),
    "bad utf-8": None,  # bytes below
    "urls of other schemes": "\n".join([*URLS, "ftp://x.example/a.jpg", "https:///nohost.jpg", "http://"]),
}


def manifest_bytes(name):
    text = ODD_MANIFESTS[name]
    if text is None:
        return ("\n".join(URLS[:5]) + "\n").encode() + b"https://x.example/\xff\xfe.jpg\n" + URLS[5].encode()
    return text.encode()


@pytest.mark.parametrize("name", ODD_MANIFESTS)
@pytest.mark.parametrize("block_size", [1 << 20, 64, 1])
def test_txt_blocks_give_the_items_of_the_line_by_line_reader(tmp_path, name, block_size):
    manifest = touch(tmp_path / "m" / "list.txt", manifest_bytes(name))
    expected = list(read_manifest(str(manifest)))  # the text file, line by line
    chunks = list(read_txt_chunks(str(manifest), block_size))
    items = [item for chunk in chunks for item in (chunk.items() if isinstance(chunk, UrlChunk) else chunk)]
    assert items == expected
    for chunk in chunks:
        if isinstance(chunk, UrlChunk):
            assert list(chunk.fingerprints) == [fingerprint(key.decode()) for key in chunk.keys]
    if name in ("plain", "crlf, no last newline", "blanks, comments, padding", "duplicates"):
        assert all(isinstance(chunk, UrlChunk) for chunk in chunks), "URL blocks without an Item each"


def test_iter_chunks_keeps_argument_order_and_iter_items_expands_them(tmp_path):
    manifest = touch(tmp_path / "list.txt", "\n".join(URLS).encode())
    touch(tmp_path / "d" / "a.jpg")
    chunks = list(iter_chunks([str(manifest), str(tmp_path / "d")]))
    assert isinstance(chunks[0], UrlChunk) and [i.key for i in chunks[-1]] == [str(tmp_path / "d" / "a.jpg")]
    assert [i.key for i in iter_items([str(manifest), str(tmp_path / "d")])][:-1] == URLS


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/a.jpg", "HTTP://EXAMPLE.COM", "hTTpS://x.y:8080/p?q#f", "http://h.com:",
        "http://-/", "http://./", "http://host?x", "http://host#f", "https://host/a[b]c",
        "http://ex\u212aample.com/", "http://[::1]/a", "http://[::1/a", "http://a:b@host/",
        "http://host:abc/", "https://", "http:///x", "http://ho\tst/", " http://host/", "http://host /x",
        "https://xn--e1afmkfd.xn--p1ai/a.jpg", "https://пример.рф/a.jpg", "http://host\\x/",
    ],
)  # fmt: skip
def test_the_plain_url_shortcut_decides_as_urlsplit(monkeypatch, url):
    fast = url_problem(url)
    monkeypatch.setattr(sources, "_PLAIN_URL", re.compile(r"(?!)"))  # never matches: urlsplit only
    assert fast == url_problem(url)
