"""batchtag export: XMP sidecars read back by exiftool, CSV by the csv module, Parquet by pyarrow."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchtag.export import table
from batchtag.export.xmp import keyword_lists
from batchtag.records import iter_valid_records
from batchtag.taggers.rules import parent_categories
from tests.export_helpers import TaggedPhotos, generated_out, require_tool
from tests.support import encode_image, run_cli


def exiftool_read(*paths: Path) -> dict[str, dict]:
    """What a photo manager would read: exiftool's view of each sidecar's XMP."""
    done = subprocess.run(
        [require_tool("exiftool"), "-j", "-struct", "-XMP:all", *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
    )
    return {Path(entry["SourceFile"]).name: entry for entry in json.loads(done.stdout)}


def as_list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def photos(tagged_photos: TaggedPhotos, tmp_path: Path) -> TaggedPhotos:
    return tagged_photos.copy_to(tmp_path)


# --------------------------------------------------------------------------- XMP


def test_xmp_sidecars_hold_the_keywords_exiftool_reads_back_and_images_are_untouched(photos):
    images_before = {p.name: p.read_bytes() for p in photos.photos.rglob("*.jpg")}
    done = run_cli("export", photos.out, "--format", "xmp")
    assert done.returncode == 0, done.stderr
    assert "1 urls" in done.stderr and "7 created" in done.stderr

    tagged = [r for r in photos.records() if r.source == "file" and r.ok and r.tags]
    assert len(tagged) == 7
    read = exiftool_read(*(Path(r.key + ".xmp") for r in tagged))
    parents = parent_categories()
    for record in tagged:
        names = [t["tag_name"] for t in record.tags]
        entry = read[Path(record.key).name + ".xmp"]
        assert as_list(entry.get("Subject")) == names
        assert (
            as_list(entry.get("HierarchicalSubject")) == keyword_lists(names, parents)["hierarchicalSubject"]
        )
        assert as_list(entry.get("TagsList")) == [h.replace("|", "/") for h in entry["HierarchicalSubject"]]
    cat = read["cat_chelsea.jpg.xmp"]
    assert "batchtag|动物|猫" in cat["HierarchicalSubject"] and "batchtag|动物" in cat["HierarchicalSubject"]

    assert not (photos.photos / "broken.jpg.xmp").exists()  # error record: no sidecar
    assert {p.name: p.read_bytes() for p in photos.photos.rglob("*.jpg")} == images_before


def test_existing_sidecar_keeps_its_rating_and_keywords_and_a_second_export_changes_nothing(photos):
    exiftool = require_tool("exiftool")
    coffee = photos.photos / "coffee.jpg"
    sidecar = Path(str(coffee) + ".xmp")
    subprocess.run(
        [exiftool, "-q", "-XMP-xmp:Rating=4", "-XMP-xmp:Label=Red", "-XMP-dc:Subject=holiday", str(sidecar)],
        check=True,
    )
    sidecar.chmod(0o640)

    first = run_cli("export", photos.out, "--format", "xmp", "--min-confidence", "90")
    assert first.returncode == 0, first.stderr
    entry = exiftool_read(sidecar)[sidecar.name]
    assert entry["Rating"] == 4 and entry["Label"] == "Red"
    coffee_tags = next(r.tags for r in photos.records() if r.key == str(coffee))
    assert as_list(entry["Subject"]) == ["holiday"] + [
        t["tag_name"] for t in coffee_tags if t["tag_confidence"] >= 90
    ]
    assert sidecar.stat().st_mode & 0o777 == 0o640
    assert sidecar.read_bytes().startswith(b"<?xpacket begin=")  # exiftool's wrapper kept

    before = tree_digest(photos.photos)
    second = run_cli("export", photos.out, "--format", "xmp", "--min-confidence", "90")
    confident = sum(1 for r in photos.records() if any(t["tag_confidence"] >= 90 for t in r.tags))
    assert second.returncode == 0 and f"0 created, 0 updated, {confident} unchanged" in second.stderr
    assert tree_digest(photos.photos) == before  # byte-identical, not even rewritten


def test_lower_min_confidence_later_adds_only_the_missing_keywords(photos):
    tagged = [r for r in photos.records() if r.ok and r.tags]
    least_sure = min(tagged, key=lambda r: max(t["tag_confidence"] for t in r.tags))
    threshold = max(t["tag_confidence"] for t in least_sure.tags) + 1  # leaves this image out
    strict = run_cli("export", photos.out, "--format", "xmp", "--min-confidence", threshold)
    assert strict.returncode == 0, strict.stderr
    sidecar = Path(least_sure.key + ".xmp")
    assert not sidecar.exists()
    first = {p: as_list(e.get("Subject")) for p, e in exiftool_read(*photos.photos.rglob("*.xmp")).items()}
    assert first and all(first.values())  # the other images got their strong tags

    assert run_cli("export", photos.out, "--format", "xmp").returncode == 0
    after = {p: as_list(e.get("Subject")) for p, e in exiftool_read(*photos.photos.rglob("*.xmp")).items()}
    assert all(len(s) == len(set(s)) for s in after.values())  # nothing twice
    assert sidecar.exists() and after[sidecar.name] == [t["tag_name"] for t in least_sure.tags]
    by_name = {Path(r.key).name + ".xmp": r for r in tagged}
    for name, subjects in first.items():  # the strong tags first, the weaker ones added after them
        assert after[name] == subjects + [
            t["tag_name"] for t in by_name[name].tags if t["tag_confidence"] < threshold
        ]


def test_a_file_at_the_sidecars_name_that_is_not_xmp_is_refused_and_left_alone(photos):
    notes = Path(str(photos.photos / "coffee.jpg") + ".xmp")
    notes.write_text("my notes about this coffee\n")
    html = Path(str(photos.photos / "cat_chelsea.jpg") + ".xmp")
    html.write_text("<html><body>not xmp</body></html>")
    done = run_cli("export", photos.out, "--format", "xmp")
    assert done.returncode == 1
    assert "2 refused" in done.stderr and "5 created" in done.stderr
    assert notes.read_text() == "my notes about this coffee\n"
    assert html.read_text() == "<html><body>not xmp</body></html>"


def test_lightroom_naming_drops_the_image_extension(photos):
    assert run_cli("export", photos.out, "--format", "xmp", "--xmp-naming", "lightroom").returncode == 0
    assert (photos.photos / "coffee.xmp").is_file() and not (photos.photos / "coffee.jpg.xmp").exists()
    entry = exiftool_read(photos.photos / "coffee.xmp")["coffee.xmp"]
    assert "咖啡" in as_list(entry["Subject"])


# --------------------------------------------------------------------------- CSV and Parquet


def test_csv_has_one_row_per_item_with_chinese_intact_for_spreadsheets(tagged_photos, tmp_path):
    path = tmp_path / "tags.csv"
    done = run_cli("export", tagged_photos.out, "--format", "csv", "-o", path)
    assert done.returncode == 0, done.stderr
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # the BOM Excel needs to read UTF-8
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    records = {r.key: r for r in tagged_photos.records()}
    assert len(rows) == len(records) == 9
    for row in rows:
        record = records[row["key"]]
        assert (row["source"], row["status"], int(row["code"]), row["message"], int(row["attempts"])) == (
            record.source,
            record.status,
            record.code,
            record.message,
            record.attempts,
        )
        assert row["tags"] == ";".join(f"{t['tag_name']}:{t['tag_confidence']}" for t in record.tags)
        assert int(row["elapsed_ms"]) == record.extra["elapsed_ms"]
    cat = next(row for row in rows if row["key"].endswith("/cat_chelsea.jpg"))
    assert cat["tags"].startswith("猫:")


def test_parquet_has_typed_columns_and_the_records_values(tagged_photos, tmp_path):
    path = tmp_path / "tags.parquet"
    done = run_cli("export", tagged_photos.out, "--format", "parquet", "-o", path, "--min-confidence", "50")
    assert done.returncode == 0, done.stderr
    read = pq.read_table(path)
    assert read.schema.field("tags").type == pa.list_(
        pa.struct([("tag_name", pa.string()), ("tag_confidence", pa.int32())])
    )
    assert read.schema.field("code").type == pa.int32() and read.schema.field("elapsed_ms").type == pa.int64()
    rows = {row["key"]: row for row in read.to_pylist()}
    records = {r.key: r for r in tagged_photos.records()}
    assert rows.keys() == records.keys()
    for key, record in records.items():
        assert rows[key]["status"] == record.status and rows[key]["code"] == record.code
        assert rows[key]["tags"] == [t for t in record.tags if t["tag_confidence"] >= 50]
    url = next(row for row in rows.values() if row["source"] == "url")
    assert url["status"] == "error" and url["message"]


def test_parquet_is_written_in_row_groups_and_keeps_unknown_fields(tmp_path, monkeypatch):
    out = tmp_path / "big.jsonl"
    generated_out(out, 5_000, ["猫", "dog", "海滩"])
    with open(out, "ab") as handle:  # a later record of a key wins; fields we do not know are kept
        handle.write(
            b'{"key":"/archive/0000/img_0000001.jpg","source":"file","status":"ok","code":0,'
            b'"message":"success","tags":[],"attempts":2,"camera":"X",'
            b'"file":{"size":123,"mtime_ns":1700000000123456789,"xxh3_128":"ab","inode":7}}\n'
        )
    monkeypatch.setattr(table, "ROWS_PER_GROUP", 1_000)
    counts = table.write_parquet(iter_valid_records(out), str(tmp_path / "big.parquet"))
    parquet = pq.ParquetFile(tmp_path / "big.parquet")
    assert counts.rows == parquet.metadata.num_rows == 5_000
    assert parquet.metadata.num_row_groups == 5
    last = parquet.read().to_pylist()[-1]
    assert last["key"].endswith("img_0000001.jpg") and last["attempts"] == 2
    assert (last["size"], last["mtime_ns"], last["xxh3_128"]) == (123, 1700000000123456789, "ab")
    assert json.loads(last["extra"]) == {"camera": "X", "file": {"inode": 7}}
    assert parquet.schema_arrow.field("mtime_ns").type == pa.int64()


def test_outputs_that_are_not_ours_are_never_overwritten(tagged_photos, tmp_path):
    for fmt in ("csv", "parquet"):
        precious = tmp_path / f"precious.{fmt}"
        precious.write_text("someone's data\n")
        done = run_cli("export", tagged_photos.out, "--format", fmt, "-o", precious)
        assert done.returncode == 2 and "not a batchtag export" in done.stderr
        assert precious.read_text() == "someone's data\n"
        ours = tmp_path / f"ours.{fmt}"
        assert run_cli("export", tagged_photos.out, "--format", fmt, "-o", ours).returncode == 0
        assert (
            run_cli("export", tagged_photos.out, "--format", fmt, "-o", ours).returncode == 0
        )  # ours: replaced
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("command", ["export", "report"])
def test_missing_or_unrecognised_out_is_exit_2_with_one_line(tmp_path, command):
    extra = ["--format", "csv"] if command == "export" else ["-o", tmp_path / "r.html"]
    missing = run_cli(command, tmp_path / "nope.jsonl", *extra)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope.jsonl" in missing.stderr
    other = tmp_path / "photo.jpg"
    other.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)))
    refused = run_cli(command, other, *extra)
    assert refused.returncode == 2 and "not a batchtag results file" in refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr


DARKTABLE_SIDECAR = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:darktable="http://darktable.sf.net/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
   xmp:Rating="3"
   darktable:xmp_version="5">
   <dc:subject>
    <rdf:Bag>
     <rdf:li>darktable|format|jpg</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <darktable:history>
    <rdf:Seq/>
   </darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def canonical(xml: bytes, drop_keywords: list[str] = ()) -> bytes:
    """The document as canonical XML without blank text, our three lists' additions removed."""
    from lxml import etree

    from batchtag.export.xmp import DIGIKAM, LR, RDF

    root = etree.fromstring(xml, etree.XMLParser(remove_blank_text=True))
    for added in root.iter(f"{{{LR}}}hierarchicalSubject", f"{{{DIGIKAM}}}TagsList"):
        added.getparent().remove(added)
    for item in list(root.iter(f"{{{RDF}}}li")):
        if item.text in drop_keywords:
            item.getparent().remove(item)
    return etree.tostring(root, method="c14n")


def test_merging_keeps_everything_a_darktable_sidecar_holds(tmp_path):
    from batchtag.export.xmp import export_sidecar

    sidecar = tmp_path / "photo.jpg.xmp"
    sidecar.write_text(DARKTABLE_SIDECAR, encoding="utf-8")
    lists = keyword_lists(["猫", "sunset"], parent_categories())
    assert export_sidecar(str(sidecar), lists) == "updated"
    merged = sidecar.read_bytes()
    assert canonical(merged, ["猫", "sunset"]) == canonical(DARKTABLE_SIDECAR.encode())
    assert merged.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<x:xmpmeta')
    entry = exiftool_read(sidecar)[sidecar.name]
    assert entry["Rating"] == 3 and entry["Xmp_version"] == 5
    assert as_list(entry["Subject"]) == ["darktable|format|jpg", "猫", "sunset"]
    assert as_list(entry["HierarchicalSubject"]) == ["batchtag|动物|猫", "batchtag|sunset"]
    assert export_sidecar(str(sidecar), lists) == "unchanged"


@pytest.mark.parametrize(
    "content",
    [
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:subject="one"/></rdf:RDF></x:xmpmeta>',
        "<svg xmlns='http://www.w3.org/2000/svg'/>",
        "\x00\x01binary",
    ],
    ids=["subject-not-a-list", "other-xml", "binary"],
)
def test_what_cannot_be_merged_is_refused_unchanged(tmp_path, content):
    from batchtag.export.xmp import NotXmp, export_sidecar

    sidecar = tmp_path / "photo.jpg.xmp"
    sidecar.write_text(content, encoding="utf-8")
    with pytest.raises(NotXmp):
        export_sidecar(str(sidecar), keyword_lists(["猫"], {}))
    assert sidecar.read_text(encoding="utf-8") == content


def test_a_tag_name_that_would_add_lines_or_is_not_xml_stops_that_item_only(tmp_path):
    from batchtag.export.xmp import export_xmp
    from batchtag.records import Record

    names = ["bad\x01name", "two\nlines", "cr\rhere", "tab\there", "line\u2028sep", "not xml \ufffe", "猫"]
    records = []
    for i, name in enumerate(names):
        image = tmp_path / f"{i}.jpg"
        image.write_bytes(encode_image())
        records.append(
            Record(str(image), "file", "ok", 0, "success", [{"tag_name": name, "tag_confidence": 90}])
        )
    counts = export_xmp(records)
    assert (counts.refused, counts.failed, counts.created) == (5, 1, 1)
    assert sorted(p.name for p in tmp_path.glob("*.xmp")) == ["6.jpg.xmp"]
    assert not list(tmp_path.glob(".*.tmp"))
