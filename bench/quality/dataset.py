"""The evaluation set: photos, what a person sees in each, and the words that count as right.

``labels.toml`` says, per photo, the things a person would tag (counted for recall) and the
words that are fair but not required; its ``[synonyms]`` table maps other names to ours. The
broad categories a tag may come with (animal, vehicle, food, ...) are not listed per photo:
``load_vocabulary`` reads them from the taggers' own rules data, so a category the rules give
a labelled word is right wherever that word is.
"""

from __future__ import annotations

import csv
import io
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

QUALITY = Path(__file__).resolve().parent
PHOTOS = QUALITY / "photos"
LABELS = QUALITY / "labels.toml"
SOURCES = QUALITY / "SOURCES.md"

HALVES = ("tune", "held-out")
KINDS = ("animals", "vehicles", "people", "food", "indoor", "outdoor")
# The people class of a photo -> (tags a person expects, tags that are fair too). "person" is
# expected wherever people are a subject; a posed group also expects "group photo" and many
# people "crowd" (the names of the model tagger's people tags in data/people.toml).
PEOPLE_TAGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "one": (("person",), ("portrait",)),
    "two": (("person",), ()),
    "several": (("person",), ("group photo", "crowd")),
    "group": (("person", "group photo"), ("crowd",)),
    "crowd": (("person", "crowd"), ("group photo",)),
}
ALTERNATIVES = "|"  # "pelican|bird": either name finds the thing


def normal(name: str) -> str:
    """Tag names compare case- and spacing-blind ("Mobile  phone" is "mobile phone")."""
    return " ".join(name.lower().split())


@dataclass(frozen=True)
class Vocabulary:
    """How a returned tag name is compared with the labels: synonyms folded to one name, and
    each name's broad categories (from the rules data)."""

    synonyms: Mapping[str, str]  # normal alias -> normal name
    categories: Mapping[str, frozenset[str]]  # normal name -> normal category names

    def canonical(self, name: str) -> str:
        key = normal(name)
        return self.synonyms.get(key, key)

    def categories_of(self, names: Iterable[str]) -> frozenset[str]:
        return frozenset(c for name in names for c in self.categories.get(name, ()))


@dataclass(frozen=True)
class Photo:
    """One labelled photo, its words already canonical."""

    name: str
    kind: str
    half: str
    people: str | None
    things: tuple[frozenset[str], ...]  # each thing: the names that find it
    right: frozenset[str]  # every name a returned tag may have and be right


def synonym_table(table: Mapping[str, list[str]]) -> dict[str, str]:
    """``{name: [aliases]}`` -> ``{alias: name}``; an alias of two names is an error."""
    folded: dict[str, str] = {}
    for name, aliases in table.items():
        for alias in aliases:
            key = normal(alias)
            if folded.get(key, normal(name)) != normal(name):
                raise ValueError(f"synonym {alias!r} is given for both {folded[key]!r} and {name!r}")
            folded[key] = normal(name)
    return folded


def rules_categories() -> dict[str, frozenset[str]]:
    """Each English tag name of the rules data -> the English names of its categories.

    Every ``*_rules.csv`` in ``batchtag/taggers/data`` with ``label_en`` and ``categories``
    columns counts (the classifier's, and any stage's added beside it); category ids are
    named by ``categories.csv``.
    """
    data = resources.files("batchtag.taggers").joinpath("data")
    names = {row["id"]: normal(row["label_en"]) for row in _csv_rows(data.joinpath("categories.csv"))}
    found: dict[str, set[str]] = {}
    for entry in sorted(data.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith("_rules.csv"):
            continue
        for row in _csv_rows(entry):
            label = normal(row.get("label_en") or "")
            if label and row.get("categories"):
                ids = (c.strip() for c in row["categories"].split(";"))
                found.setdefault(label, set()).update(names[c] for c in ids if c in names)
    for category in names.values():  # a category's own name is its own category
        found.setdefault(category, set()).add(category)
    return {label: frozenset(cats) for label, cats in found.items()}


def _csv_rows(entry: Any) -> list[dict[str, str]]:
    text = entry.read_text(encoding="utf-8-sig")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def load_vocabulary(synonyms: Mapping[str, list[str]]) -> Vocabulary:
    return Vocabulary(synonym_table(synonyms), rules_categories())


def parse_photos(labels: Mapping[str, Any], vocabulary: Vocabulary) -> list[Photo]:
    """The photos of a parsed labels file (every top-level table but ``[synonyms]``)."""
    photos = []
    for name, entry in labels.items():
        if name == "synonyms":
            continue
        photos.append(_photo(name, entry, vocabulary))
    return sorted(photos, key=lambda p: p.name)


def _photo(name: str, entry: Mapping[str, Any], vocabulary: Vocabulary) -> Photo:
    kind, half, people = entry.get("kind"), entry.get("half"), entry.get("people")
    if kind not in KINDS:
        raise ValueError(f"{name}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if half not in HALVES:
        raise ValueError(f"{name}: half {half!r} is not one of {', '.join(HALVES)}")
    if people is not None and people not in PEOPLE_TAGS:
        raise ValueError(f"{name}: people {people!r} is not one of {', '.join(PEOPLE_TAGS)}")
    expected, fair = PEOPLE_TAGS[people] if people else ((), ())
    things = [_alternatives(t, vocabulary) for t in entry.get("things", [])] + [
        frozenset({vocabulary.canonical(t)}) for t in expected
    ]
    if not things:
        raise ValueError(f"{name}: no things labelled")
    named = {n for alternatives in things for n in alternatives}
    named |= {vocabulary.canonical(w) for w in (*entry.get("also_ok", []), *fair)}
    return Photo(name, kind, half, people, tuple(things), frozenset(named | vocabulary.categories_of(named)))


def _alternatives(thing: str, vocabulary: Vocabulary) -> frozenset[str]:
    names = frozenset(vocabulary.canonical(n) for n in thing.split(ALTERNATIVES) if n.strip())
    if not names:
        raise ValueError(f"empty thing {thing!r}")
    return names


def load(path: Path = LABELS) -> tuple[list[Photo], Vocabulary]:
    """The evaluation set's photos and the vocabulary they were read with."""
    labels = tomllib.loads(path.read_text(encoding="utf-8"))
    vocabulary = load_vocabulary(labels.get("synonyms", {}))
    return parse_photos(labels, vocabulary), vocabulary


_SOURCE_ROW = re.compile(r"^\|\s*(?P<file>[^|\s]+\.jpg)\s*\|(?P<cells>.*)\|\s*$")


def sources(path: Path = SOURCES) -> dict[str, list[str]]:
    """SOURCES.md's table: file -> its other cells (image, repository, original, licence, ...)."""
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _SOURCE_ROW.match(line)
        if match:
            rows[match["file"]] = [c.strip() for c in match["cells"].split("|")]
    return rows
