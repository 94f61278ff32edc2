"""Sidecars follow the tags: the keywords batchtag wrote are replaced on each export (a
retag in another language leaves only the current ones), everyone else's stay; read back
with exiftool. And the walk counts sidecars and system files as what they are."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from batchtag.records import iter_valid_records
from tests.export_helpers import require_tool
from tests.support import run_cli, run_local, tiny_jpegs


def exiftool_keywords(sidecar: Path) -> tuple[list[str], list[str]]:
    """dc:subject and lr:hierarchicalSubject as exiftool reads them."""
    done = subprocess.run(
        [require_tool("exiftool"), "-j", "-XMP-dc:Subject", "-XMP-lr:HierarchicalSubject", str(sidecar)],
        capture_output=True,
        text=True,
        check=True,
    )
    entry = json.loads(done.stdout)[0]

    def as_list(value: object) -> list[str]:
        return [] if value is None else [str(v) for v in value] if isinstance(value, list) else [str(value)]

    return as_list(entry.get("Subject")), as_list(entry.get("HierarchicalSubject"))


def tag_names(out: Path, key: str) -> list[str]:
    (record,) = [r for r in iter_valid_records(str(out)) if r.key == key]
    return [t["tag_name"] for t in record.tags]


def test_a_retag_in_another_language_replaces_our_keywords_and_keeps_a_persons(tmp_path):
    exiftool = require_tool("exiftool")
    photos = tmp_path / "photos"
    (image,) = tiny_jpegs(photos, 1)
    sidecar = Path(image + ".xmp")
    out = tmp_path / "out.jsonl"
    assert run_local(photos, "-o", out, "--lang", "zh").returncode == 0
    assert run_cli("export", out, "--format", "xmp", "--no-progress").returncode == 0
    chinese = tag_names(out, image)
    assert set(chinese) <= set(exiftool_keywords(sidecar)[0])

    # A person adds keywords with another tool, flat and hierarchical.
    subprocess.run(
        [
            exiftool,
            "-q",
            "-overwrite_original",
            "-XMP-dc:Subject+=sunset",
            "-XMP-lr:HierarchicalSubject+=Trips|Rome",
            str(sidecar),
        ],
        check=True,
    )
    assert run_local(photos, "-o", out, "--lang", "en", "--retag").returncode == 0
    english = tag_names(out, image)
    assert english and not set(english) & set(chinese)
    export = run_cli("export", out, "--format", "xmp", "--no-progress")
    assert export.returncode == 0 and "1 updated" in export.stderr, export.stderr

    subject, hierarchical = exiftool_keywords(sidecar)
    assert sorted(subject) == sorted([*english, "sunset"])  # no Chinese tag left, the person's kept
    assert "Trips|Rome" in hierarchical
    ours = [h for h in hierarchical if h.startswith("batchtag|")]
    assert sorted(h.rsplit("|", 1)[1] for h in ours) == sorted(english)
    # Exported again with nothing new: byte for byte the same file.
    before = sidecar.read_bytes()
    assert "1 unchanged" in run_cli("export", out, "--format", "xmp", "--no-progress").stderr
    assert sidecar.read_bytes() == before


def test_the_walk_counts_sidecars_and_system_files_by_those_names(tmp_path):
    photos = tmp_path / "photos"
    keys = tiny_jpegs(photos, 3)
    for key in keys:
        Path(key + ".xmp").write_text("<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "._img000000.jpg"):
        (photos / name).write_bytes(b"\0system")
    (photos / "notes.pdf").write_bytes(b"%PDF")
    summary = tmp_path / "summary.json"
    result = run_local(photos, "-o", tmp_path / "out.jsonl", "--summary-json", summary)
    assert result.returncode == 0, result.stderr
    left_out = json.loads(summary.read_text())["left_out"]["files"]
    assert left_out["sidecars"] == {".xmp": 3}
    assert sum(left_out["system files"].values()) == 4
    assert left_out["unsupported format"] == {".pdf": 1}
    assert "hidden" not in left_out
    assert "sidecars: .xmp 3" in result.stderr and "system files" in result.stderr
    # --include-hidden does not make an AppleDouble file an image.
    again = run_local(photos, "-o", tmp_path / "out2.jsonl", "--include-hidden")
    assert again.returncode == 0 and "system files" in again.stderr
