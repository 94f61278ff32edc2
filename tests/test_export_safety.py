"""XMP export against a hostile folder or OUT: links planted at sidecar names, crafted keys,
tag text that tries to add lines or markup; as root and as an ordinary user."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchtag.export.sidecar_io import Unsafe, open_folder
from batchtag.records import Record
from tests.export_helpers import require_tool
from tests.support import encode_image, run_cli

VICTIM_XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description rdf:about=""/></rdf:RDF></x:xmpmeta>\n'
)


def tagged(key: str, *names: str) -> Record:
    return Record(key, "file", "ok", 0, "success", [{"tag_name": n, "tag_confidence": 90} for n in names], 1)


def write_out(path: Path, records: list[Record]) -> Path:
    path.write_bytes(b"".join(r.to_line() for r in records))
    return path


def snapshot(folder: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every entry under ``folder``: links as their target, files as their bytes."""
    entries = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            entries[str(p.relative_to(folder))] = ("link", os.readlink(p))
        elif p.is_file():
            entries[str(p.relative_to(folder))] = ("file", p.read_bytes())
    return entries


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """photos/ (three real JPEGs) and victim/ (a file someone cares about) side by side."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "victim").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "photos" / name).write_bytes(encode_image())
    (tmp_path / "victim" / "other.xmp").write_text(VICTIM_XMP)
    return tmp_path


def test_a_symlinked_sidecar_is_refused_dangling_or_not_and_the_export_goes_on(tree):
    photos = tree / "photos"
    (photos / "a.jpg.xmp").symlink_to("../victim/other.xmp")
    (photos / "b.jpg.xmp").symlink_to("../victim/new.xmp")  # dangling: would create a file there
    out = write_out(tree / "out.jsonl", [tagged(str(photos / n), "猫") for n in ("a.jpg", "b.jpg", "c.jpg")])
    victim_before = snapshot(tree / "victim")

    done = run_cli("export", out, "--format", "xmp")
    assert done.returncode == 1
    assert "1 created" in done.stderr and "2 refused" in done.stderr
    assert done.stderr.count("symbolic link") == 2
    assert snapshot(tree / "victim") == victim_before  # neither replaced nor created
    assert os.readlink(photos / "a.jpg.xmp") == "../victim/other.xmp"
    assert os.readlink(photos / "b.jpg.xmp") == "../victim/new.xmp"
    assert "猫" in (photos / "c.jpg.xmp").read_text(encoding="utf-8")
    assert not list(photos.glob(".*.tmp"))


def test_a_link_planted_between_reading_and_renaming_is_never_written_through(tree):
    photos = tree / "photos"
    with open_folder(str(photos)) as folder:
        assert folder.read("a.jpg.xmp") is None
        (photos / "a.jpg.xmp").symlink_to("../victim/other.xmp")
        with pytest.raises(Unsafe, match="symbolic link"):
            folder.replace("a.jpg.xmp", b"<x/>", None, None)
    assert (tree / "victim" / "other.xmp").read_text() == VICTIM_XMP
    assert not list(photos.glob(".*.tmp"))


def test_crafted_keys_are_refused_and_only_images_by_their_bytes_get_a_sidecar(tree):
    photos, elsewhere = tree / "photos", tree / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.jpg").write_bytes(encode_image())
    (elsewhere / "notes.txt").write_text("my notes\n")
    (elsewhere / "fake.jpg").write_text("a text file named like a photo\n")
    os.mkfifo(elsewhere / "pipe.jpg")
    (elsewhere / "folder.jpg").mkdir()
    crafted = [
        f"{photos}/../elsewhere/x.jpg",  # .. in an absolute key
        "../elsewhere/x.jpg",  # relative, resolved against wherever export runs
        f"{elsewhere}/./x.jpg",
        f"{elsewhere}//x.jpg",
        "elsewhere/x.jpg",
        str(elsewhere / "notes.txt"),  # regular files that are not images
        str(elsewhere / "fake.jpg"),
        str(elsewhere / "pipe.jpg"),  # a FIFO: must not hang
        str(elsewhere / "folder.jpg"),
    ]
    records = [tagged(key, "猫") for key in crafted] + [tagged(str(photos / "a.jpg"), "猫")]
    out = write_out(tree / "out.jsonl", records)
    before = snapshot(elsewhere)

    done = run_cli("export", out, "--format", "xmp", cwd=photos, timeout=60)
    assert done.returncode == 1, done.stderr
    assert f"1 created, 0 updated, 0 unchanged; {len(crafted)} refused" in done.stderr
    assert done.stderr.count("not a normalised path") == 3 and done.stderr.count("not an absolute path") == 2
    assert done.stderr.count("not an image by its bytes") == 2
    assert done.stderr.count("not a regular file") == 2
    assert snapshot(elsewhere) == before and not list(tree.rglob("x.jpg.xmp"))
    assert (photos / "a.jpg.xmp").exists()


def test_tag_text_cannot_add_lines_or_markup_to_a_sidecar(tree):
    photos = tree / "photos"
    markup = '</rdf:li></rdf:Bag><evil xmlns="x"/><rdf:Bag><rdf:li>&amp;"\'>'
    records = [
        tagged(str(photos / "a.jpg"), "猫", "dog\nx:injected='1'"),  # a line of its own
        tagged(str(photos / "b.jpg"), "猫", "cr\r\nline"),
        tagged(str(photos / "c.jpg"), "猫", markup),
    ]
    done = run_cli("export", write_out(tree / "out.jsonl", records), "--format", "xmp")
    assert done.returncode == 1 and "1 created" in done.stderr and "2 refused" in done.stderr
    assert done.stderr.count("line break or control character") == 2
    assert not (photos / "a.jpg.xmp").exists() and not (photos / "b.jpg.xmp").exists()
    sidecar = photos / "c.jpg.xmp"
    assert b"<evil" not in sidecar.read_bytes()
    exiftool = require_tool("exiftool")
    read = subprocess.run([exiftool, "-j", "-XMP-dc:Subject", str(sidecar)], capture_output=True, check=True)
    assert json.loads(read.stdout)[0]["Subject"] == ["猫", markup]  # one keyword, as it was


def test_a_new_sidecar_made_by_root_belongs_to_the_images_owner(tree):
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    nobody = pwd.getpwnam("nobody")
    image = tree / "photos" / "a.jpg"
    os.chown(image, nobody.pw_uid, nobody.pw_gid)
    done = run_cli("export", write_out(tree / "out.jsonl", [tagged(str(image), "猫")]), "--format", "xmp")
    assert done.returncode == 0, done.stderr
    info = (tree / "photos" / "a.jpg.xmp").stat()
    assert (info.st_uid, info.st_gid) == (nobody.pw_uid, nobody.pw_gid)


# --------------------------------------------------------------------------- as a user


@pytest.fixture
def user_tree() -> Iterator[tuple[Path, pwd.struct_passwd]]:
    """A tree in /tmp that `nobody` owns (pytest's own tmp folders are root's, mode 700)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another user; as a user this file's other tests cover it")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this machine")
    root = Path(tempfile.mkdtemp(prefix="batchtag-export-user-"))
    try:
        yield root, nobody
    finally:
        shutil.rmtree(root)


def run_as(user: pwd.struct_passwd, *args) -> subprocess.CompletedProcess:
    """`batchtag ARGS` as ``user`` (tests/run_as_user.py drops root after its imports)."""
    return subprocess.run(
        [sys.executable, "-m", "tests.run_as_user", str(user.pw_uid), str(user.pw_gid), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def test_as_a_user_links_crafted_keys_and_folders_it_cannot_write_are_refused_and_the_rest_exported(
    user_tree,
):
    """Root bypasses permissions, so here an ordinary user runs the export: the victim is
    the user's own file (writable: a followed link would have replaced it), one image sits
    in a folder the user cannot write, and the attacks above are repeated."""
    root, user = user_tree
    photos, victim, locked = root / "photos", root / "victim", root / "locked"
    for folder in (photos, victim, locked):
        folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (photos / name).write_bytes(encode_image())
    (locked / "d.jpg").write_bytes(encode_image())
    (victim / "other.xmp").write_text(VICTIM_XMP)
    (photos / "a.jpg.xmp").symlink_to("../victim/other.xmp")
    (photos / "b.jpg.xmp").symlink_to("../victim/new.xmp")
    records = [tagged(str(photos / n), "猫") for n in ("a.jpg", "b.jpg", "c.jpg")]
    records += [tagged(str(locked / "d.jpg"), "猫"), tagged(f"{photos}/../locked/d.jpg", "猫")]
    out = write_out(root / "out.jsonl", records)
    for path in [root, *root.rglob("*")]:
        if path != locked and not (path.is_relative_to(locked)):
            os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
    locked.chmod(0o755)  # root's: the user can read d.jpg but not write beside it
    victim_before = snapshot(victim)

    done = run_as(user, "export", out, "--format", "xmp", "--no-progress")
    assert done.returncode == 1, done.stderr
    assert "1 created, 0 updated, 0 unchanged; 3 refused, 1 failed" in done.stderr, done.stderr
    assert "Permission denied" in done.stderr and "Traceback" not in done.stderr
    assert snapshot(victim) == victim_before
    assert not (locked / "d.jpg.xmp").exists() and not list(locked.glob(".*"))
    made = photos / "c.jpg.xmp"
    assert "猫" in made.read_text(encoding="utf-8") and made.stat().st_uid == user.pw_uid
    assert stat.S_ISLNK(os.lstat(photos / "a.jpg.xmp").st_mode)


def test_a_record_with_malformed_tags_is_a_broken_line_for_every_reader_not_a_traceback(tree, tmp_path):
    photos = tree / "photos"
    good = tagged(str(photos / "a.jpg"), "猫")
    bad_tags = [
        {"tag_name": 5, "tag_confidence": 90},
        {"tag_name": "x", "tag_confidence": "90"},
        {"nope": 1},
        7,
    ]
    lines = [
        json.dumps({**json.loads(tagged(str(photos / n), "猫").to_line()), "tags": [tag]}).encode() + b"\n"
        for n, tag in zip(("b.jpg", "c.jpg", "b.jpg", "c.jpg"), bad_tags, strict=True)
    ]
    out = tree / "out.jsonl"
    out.write_bytes(good.to_line() + b"".join(lines))
    for args in (
        ["export", out, "--format", "xmp"],
        ["export", out, "--format", "csv", "-o", tmp_path / "t.csv"],
        ["export", out, "--format", "parquet", "-o", tmp_path / "t.parquet"],
        ["report", out, "-o", tmp_path / "r.html"],
    ):
        done = run_cli(*args, "--no-progress")
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert (photos / "a.jpg.xmp").exists() and not (photos / "b.jpg.xmp").exists()
    assert len((tmp_path / "t.csv").read_text(encoding="utf-8-sig").splitlines()) == 2  # header, one row
