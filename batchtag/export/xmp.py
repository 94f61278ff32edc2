"""Keyword sidecars (XMP) for photo managers: digiKam, darktable, Lightroom, PhotoPrism.

Each tagged file gets ``photo.jpg.xmp`` beside it (digiKam and darktable's naming) or,
with ``lightroom`` naming, ``photo.xmp``. Tags go into the three places these programs
read keywords from: ``dc:subject`` (flat), ``lr:hierarchicalSubject`` (``batchtag|动物|猫``)
and ``digiKam:TagsList`` (``batchtag/动物/猫``); the middle level is the tag's broad
category from the tagger's rules.

An existing sidecar is merged into, never rewritten from scratch: its other properties,
its namespace prefixes and its processing instructions stay, keywords already present are
not added again, and a sidecar that already holds every keyword is not written at all (so
a second export leaves the files byte-identical). Keywords batchtag wrote are recognised by
its hierarchical root (``batchtag|...``; in ``dc:subject``, the last levels of those) and
replaced by the current tags on every export, so a retag or another language leaves only
the current tags; keywords a person or another program added are kept. A file at the
sidecar's name that is not XMP is refused, never overwritten. Where and how a sidecar is
written (no symlink followed, only beside a file that is an image by its bytes, only for
absolute normalised keys, temp file and rename inside the folder) is ``sidecar_io``'s job;
tag text with a line break or control character is refused per item. Images are only read,
for their first bytes.

lxml, not the standard library's ElementTree: ElementTree renames every namespace prefix
(``ns0:``) and drops the ``<?xpacket?>`` instructions and comments of a file it rewrites;
lxml keeps what it does not change as it was.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from lxml import etree

from batchtag.export import Naming
from batchtag.export.common import tags_at_least
from batchtag.export.sidecar_io import Folder, ImageFacts, Unsafe, key_problem, open_folder
from batchtag.records import Record

log = logging.getLogger(__name__)


X = "adobe:ns:meta/"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
LR = "http://ns.adobe.com/lightroom/1.0/"
DIGIKAM = "http://www.digikam.org/ns/1.0/"
ROOT_TAG = "batchtag"

# (namespace, prefix, property, RDF container): the three keyword lists we write.
KEYWORD_PROPERTIES = (
    (DC, "dc", "subject", "Bag"),
    (LR, "lr", "hierarchicalSubject", "Bag"),
    (DIGIKAM, "digiKam", "TagsList", "Seq"),
)
NEW_SIDECAR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    f'<x:xmpmeta xmlns:x="{X}" x:xmptk="batchtag">\n'
    f' <rdf:RDF xmlns:rdf="{RDF}">\n'
    f'  <rdf:Description rdf:about=""\n    xmlns:dc="{DC}"\n    xmlns:lr="{LR}"\n'
    f'    xmlns:digiKam="{DIGIKAM}">\n'
    "  </rdf:Description>\n"
    " </rdf:RDF>\n"
    "</x:xmpmeta>\n"
).encode()


class NotXmp(Exception):
    """The file at a sidecar's name is not an XMP packet we can merge into."""


@dataclass
class XmpCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    refused: int = 0  # not XMP or a link at the sidecar's name, a name clash, a key or tag text not trusted
    failed: int = 0  # the sidecar could not be written (permissions, disk)
    skipped_url: int = 0
    untagged: int = 0  # error records, or no tag at the minimum confidence
    missing: int = 0  # the image is no longer there

    @property
    def problems(self) -> int:
        return self.refused + self.failed


# --------------------------------------------------------------------------- keywords


def sidecar_path(image: str, naming: Naming = "default") -> str:
    if naming == "lightroom":
        return os.path.splitext(image)[0] + ".xmp"
    return image + ".xmp"


def keyword_lists(names: Iterable[str], parents: dict[str, str]) -> dict[str, list[str]]:
    """The three lists for these tag names, keyed by property name, in the tags' order."""
    names = list(dict.fromkeys(names))
    paths = [[ROOT_TAG, parents[n], n] if n in parents else [ROOT_TAG, n] for n in names]
    return {
        "subject": names,
        "hierarchicalSubject": ["|".join(p) for p in paths],
        "TagsList": ["/".join(p) for p in paths],
    }


# --------------------------------------------------------------------------- merging


def parse_sidecar(data: bytes) -> etree._ElementTree:
    """An XMP document, or NotXmp. No entities, no network: a sidecar is untrusted input."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise NotXmp(f"not XML ({exc.msg})") from None
    if root.tag not in (f"{{{X}}}xmpmeta", f"{{{RDF}}}RDF"):
        raise NotXmp(f"XML but not XMP (root element {root.tag!r})")
    return root.getroottree()


def descriptions_of(tree: etree._ElementTree) -> list[etree._Element]:
    """The rdf:Description elements under rdf:RDF (one is made if there is none)."""
    root = tree.getroot()
    rdf = root if root.tag == f"{{{RDF}}}RDF" else root.find(f"{{{RDF}}}RDF")
    if rdf is None:
        raise NotXmp("XMP without rdf:RDF")
    descriptions = rdf.findall(f"{{{RDF}}}Description")
    if not descriptions:
        description = etree.SubElement(rdf, f"{{{RDF}}}Description", {f"{{{RDF}}}about": ""})
        place_indented(rdf, description)
        descriptions = [description]
    return descriptions


def merge_keywords(tree: etree._ElementTree, lists: dict[str, list[str]]) -> bool:
    """Make the document's keywords from batchtag the current ones, keeping everyone
    else's; whether anything changed. Ours are the hierarchical keywords under our root
    (``batchtag|...``, ``batchtag/...``) and the flat ones named by their last level: a
    retag or a language switch replaces them all, a person's keywords stay."""
    descriptions = descriptions_of(tree)
    containers = {}
    for namespace, prefix, name, kind in KEYWORD_PROPERTIES:
        container = find_container(descriptions, namespace, name)
        if container is None:
            prop = etree.Element(f"{{{namespace}}}{name}", nsmap={prefix: namespace})
            container = etree.SubElement(prop, f"{{{RDF}}}{kind}")
            place_indented(descriptions[0], prop)
        containers[name] = container
    ours = keywords_we_wrote(containers)
    changed = False
    for name, container in containers.items():
        wanted = lists[name]
        for item in container.findall(f"{{{RDF}}}li"):
            if (item.text or "") in ours[name] and (item.text or "") not in wanted:
                remove_keeping_indent(item)
                changed = True
        present = {li.text or "" for li in container.findall(f"{{{RDF}}}li")}
        for value in wanted:
            if value not in present:
                item = etree.Element(f"{{{RDF}}}li")
                item.text = value
                place_indented(container, item)
                present.add(value)
                changed = True
    return changed


def keywords_we_wrote(containers: dict[str, etree._Element]) -> dict[str, set[str]]:
    """Per property, the values an earlier export of ours wrote: under our root in the two
    hierarchical lists, and in dc:subject the last level of those."""
    values = {name: [li.text or "" for li in c.findall(f"{{{RDF}}}li")] for name, c in containers.items()}
    hierarchical = {v for v in values["hierarchicalSubject"] if v.startswith(ROOT_TAG + "|")}
    tags_list = {v for v in values["TagsList"] if v.startswith(ROOT_TAG + "/")}
    leaves = {v.rsplit("|", 1)[1] for v in hierarchical} | {v.rsplit("/", 1)[1] for v in tags_list}
    return {"subject": leaves, "hierarchicalSubject": hierarchical, "TagsList": tags_list}


def remove_keeping_indent(item: etree._Element) -> None:
    """Remove a list item; the whitespace before the next sibling (or the closing tag) stays."""
    parent = item.getparent()
    previous = item.getprevious()
    if previous is not None:
        previous.tail = item.tail
    else:
        parent.text = item.tail
    parent.remove(item)


def find_container(descriptions: list[etree._Element], namespace: str, name: str) -> etree._Element | None:
    """The rdf:Bag/Seq of a property in any Description; NotXmp if it is not a list."""
    for description in descriptions:
        prop = description.find(f"{{{namespace}}}{name}")
        if prop is None:
            if description.get(f"{{{namespace}}}{name}") is not None:
                raise NotXmp(f"{name} is a single value, not a list")
            continue
        container = next(iter(prop), None)
        if container is None or container.tag not in (f"{{{RDF}}}Bag", f"{{{RDF}}}Seq", f"{{{RDF}}}Alt"):
            raise NotXmp(f"{name} is not an RDF list")
        return container
    return None


def place_indented(parent: etree._Element, child: etree._Element) -> None:
    """Append ``child`` as the last child of ``parent``, indented like its siblings, or one
    space deeper than ``parent`` when it is the first (the way exiftool writes)."""
    if len(parent):
        before_last = parent[-2].tail if len(parent) > 1 else parent.text
        indent = last_line(before_last) or indent_of(parent) + " "
        last = parent[-1]
        child.tail = last.tail
        last.tail = indent
    else:
        indent = indent_of(parent) + " "
        parent.text = indent
        child.tail = indent_of(parent)
    parent.append(child)
    if len(child):
        etree.indent(child, space=" ", level=len(indent) - 1)


def indent_of(element: etree._Element) -> str:
    """The newline and spaces before ``element``'s start tag (one space a level if unknown)."""
    previous, parent = element.getprevious(), element.getparent()
    before = previous.tail if previous is not None else parent.text if parent is not None else None
    return last_line(before) or "\n" + " " * sum(1 for _ in element.iterancestors())


def last_line(whitespace: str | None) -> str | None:
    """``"\\n\\n  "`` -> ``"\\n  "``: the indentation of the next line, without blank lines."""
    if not whitespace or "\n" not in whitespace or whitespace.strip():
        return None
    return "\n" + whitespace.rsplit("\n", 1)[1]


_ROOT_START = re.compile(rb"<(?![?!])([^\s/>]+)")


def serialise(tree: etree._ElementTree, original: bytes) -> bytes:
    """The document with the bytes around the root element (``<?xpacket?>`` wrapper, XML
    declaration, padding) exactly as they were; only the root element is serialised anew."""
    root = tree.getroot()
    element = etree.tostring(root, encoding="UTF-8", xml_declaration=False, with_tail=False)
    start = _ROOT_START.search(original)
    if start:
        qname = start.group(1)
        end = original.rfind(b"</" + qname + b">")
        if end > start.start() and etree.QName(root).localname == qname.split(b":")[-1].decode():
            return original[: start.start()] + element + original[end + len(qname) + 3 :]
    return etree.tostring(tree, encoding="UTF-8", xml_declaration=True) + b"\n"


# --------------------------------------------------------------------------- writing


def export_sidecar(
    path: str, lists: dict[str, list[str]], folder: Folder | None = None, owner: ImageFacts | None = None
) -> Literal["created", "updated", "unchanged"]:
    """Create or merge one sidecar, in ``folder`` (the path's folder, opened here when not
    given); NotXmp if the file there is someone else's, Unsafe if it is a link or not a
    regular file (``sidecar_io`` does all the opening and writing)."""
    if folder is None:
        with open_folder(os.path.dirname(path) or ".") as opened:
            return export_sidecar(path, lists, opened, owner)
    name = os.path.basename(path)
    found = folder.read(name)
    original, previous = found if found is not None else (None, None)
    tree = parse_sidecar(original if original is not None else NEW_SIDECAR)
    changed = merge_keywords(tree, lists)
    if original is not None and not changed:
        return "unchanged"
    folder.replace(name, serialise(tree, original if original is not None else NEW_SIDECAR), previous, owner)
    return "created" if original is None else "updated"


def text_problem(names: list[str]) -> str | None:
    """Why these tag names cannot go into a sidecar, or None. lxml escapes markup (``<``,
    ``&``); a line break or another control character would still put text on a line of
    its own, or is not XML at all, so an item with one is refused rather than altered."""
    for name in names:
        if any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in name):
            return f"tag name {name!r} holds a line break or control character; no sidecar written"
    return None


def export_xmp(records: Iterable[Record], min_confidence: int = 0, naming: Naming = "default") -> XmpCounts:
    from batchtag.taggers.rules import parent_categories

    parents = parent_categories()
    counts = XmpCounts()
    claimed: set[str] = set()  # lightroom naming: photo.jpg and photo.png both want photo.xmp
    for record in records:
        if record.source == "url":
            counts.skipped_url += 1
            continue
        names = [t["tag_name"] for t in tags_at_least(record, min_confidence)]
        if not record.ok or not names:
            counts.untagged += 1
            continue
        if problem := key_problem(record.key):
            refuse(counts, record.key, problem)
            continue
        path = sidecar_path(record.key, naming)
        if problem := text_problem(names):
            refuse(counts, path, problem)
            continue
        if os.path.basename(path) == os.path.basename(record.key):
            refuse(counts, path, "is the image itself")
            continue
        if naming == "lightroom":
            if path in claimed:
                refuse(counts, path, "another image in this export has the same name without extension")
                continue
            claimed.add(path)
        try:
            with open_folder(os.path.dirname(record.key)) as folder:
                image = folder.image(os.path.basename(record.key))
                outcome = export_sidecar(path, keyword_lists(names, parents), folder, image)
        except FileNotFoundError:
            counts.missing += 1
            continue
        except Unsafe as exc:
            refuse(counts, path, str(exc))
            continue
        except NotXmp as exc:
            refuse(counts, path, f"exists and is not an XMP sidecar ({exc}); left untouched")
            continue
        except OSError as exc:
            counts.failed += 1
            log.warning("%s: cannot write: %s", path, exc.strerror or exc)
            continue
        except ValueError as exc:  # a tag name XML cannot hold
            counts.failed += 1
            log.warning("%s: not written: %s", path, exc)
            continue
        setattr(counts, outcome, getattr(counts, outcome) + 1)
    return counts


def refuse(counts: XmpCounts, path: str, why: str) -> None:
    counts.refused += 1
    log.warning("%s: %s", path, why)
