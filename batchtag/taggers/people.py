"""Faces to people tags (人物 / person, 合影 / group photo, 人像 / portrait), from ``people.toml``.

The rules are data: each tag names the faces it counts (score and size floors) and how many
of them it needs; the thresholds sit next to the detector scores they were chosen from in
``data/people.toml``. ``PeopleRules.merge`` puts the people tags in front of the classifier's
tags, so that a tag the classifier also gives (its "person" category) appears once, with the
higher confidence.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from batchtag.taggers.base import LANGS, Tag
from batchtag.taggers.faces import DetectorSettings, Face

TAG_KEYS = frozenset({"id", "label_en", "label_zh", "min_score", "min_faces", "max_faces", "min_face_area"})


@dataclass(frozen=True)
class PeopleTag:
    """One ``[[tag]]`` of ``people.toml``.

    Counted faces: score >= ``min_score`` and box area >= ``min_face_area`` (share of the
    photo). The tag applies when ``min_faces`` <= count <= ``max_faces``; its confidence is
    the score of the ``min_faces``-th strongest counted face, the weakest one it needed.
    """

    id: str
    label_en: str
    label_zh: str
    min_score: float
    min_faces: int = 1
    max_faces: int | None = None
    min_face_area: float = 0.0

    def label(self, lang: str) -> str:
        return self.label_zh if lang == "zh" else self.label_en

    def confidence(self, faces: Sequence[Face]) -> float | None:
        """The tag's score for a photo's faces (strongest first), or None when it does not apply."""
        counted = [f.score for f in faces if f.score >= self.min_score and f.area >= self.min_face_area]
        if len(counted) < self.min_faces or (self.max_faces is not None and len(counted) > self.max_faces):
            return None
        return sorted(counted, reverse=True)[self.min_faces - 1]


def _fraction(table: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: {key} must be a number, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: {key} {value} must be in [0, 1]")
    return float(value)


def _count(table: dict[str, Any], key: str, where: str, default: int | None) -> int | None:
    value = table.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key} must be a whole number >= 1, got {value!r}")
    return value


def parse_tag(table: dict[str, Any], where: str) -> PeopleTag:
    unknown = sorted(set(table) - TAG_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    for key in ("id", "label_en", "label_zh"):
        if not isinstance(table.get(key), str) or not table[key].strip():
            raise ValueError(f"{where}: {key} must be a non-empty string")
    min_score = _fraction(table, "min_score", where)
    if min_score == 0.0:
        raise ValueError(f"{where}: min_score 0 would tag every photo")
    min_faces = _count(table, "min_faces", where, 1)
    max_faces = _count(table, "max_faces", where, None)
    assert min_faces is not None
    if max_faces is not None and max_faces < min_faces:
        raise ValueError(f"{where}: max_faces {max_faces} is below min_faces {min_faces}")
    return PeopleTag(
        id=table["id"].strip(),
        label_en=table["label_en"].strip(),
        label_zh=table["label_zh"].strip(),
        min_score=min_score,
        min_faces=min_faces,
        max_faces=max_faces,
        min_face_area=_fraction(table, "min_face_area", where, 0.0),
    )


def parse_detector(table: dict[str, Any], where: str) -> DetectorSettings:
    known = {f.name for f in fields(DetectorSettings)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for key in ("min_score", "nms_iou", "max_contained", "tile_overlap"):
        if key in table:
            values[key] = _fraction(table, key, where)
    if "tiles" in table:
        values["tiles"] = _count(table, "tiles", where, 1)
    return DetectorSettings(**values)


def _tag(name: str, confidence: float) -> Tag:
    return Tag(tag_name=name, tag_confidence=max(0, min(100, round(100.0 * confidence))))


class PeopleRules:
    """The detector settings and the people tags of ``people.toml``, in one language."""

    def __init__(self, detector: DetectorSettings, tags: Sequence[PeopleTag], lang: str = "zh") -> None:
        if lang not in LANGS:
            raise ValueError(f"unknown lang {lang!r}; choose one of {', '.join(LANGS)}")
        self.detector = detector
        self.tags = tuple(tags)
        self.lang = lang

    @classmethod
    def load(cls, lang: str = "zh", path: Path | None = None) -> PeopleRules:
        """Read and validate the TOML (the packaged one by default); ValueError if broken."""
        source = path or resources.files("batchtag.taggers").joinpath("data", "people.toml")
        where = str(source)
        try:
            data = tomllib.loads(source.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{where}: {exc}") from None
        unknown = sorted(set(data) - {"detector", "tag"})
        if unknown:
            raise ValueError(f"{where}: unknown section(s) {', '.join(unknown)}")
        detector = parse_detector(data.get("detector", {}), f"{where} [detector]")
        tags = [parse_tag(t, f"{where} [[tag]] #{i + 1}") for i, t in enumerate(data.get("tag", []))]
        if not tags:
            raise ValueError(f"{where}: no [[tag]] entries")
        ids = [t.id for t in tags]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: duplicate tag ids in {ids}")
        return cls(detector, tags, lang)

    def tags_for(self, faces: Sequence[Face]) -> list[Tag]:
        """The people tags one photo's faces earn, in file order."""
        found = ((t.label(self.lang), t.confidence(faces)) for t in self.tags)
        return [_tag(name, conf) for name, conf in found if conf is not None]

    def merge(self, faces: Sequence[Face], classifier_tags: list[Tag], max_tags: int) -> list[Tag]:
        """People tags first, then the classifier's; a name given by both keeps the higher confidence."""
        people = self.tags_for(faces)
        if not people:
            return classifier_tags
        theirs = {t["tag_name"]: t["tag_confidence"] for t in classifier_tags}
        ours = {t["tag_name"] for t in people}
        merged = [_merged(t, theirs) for t in people]
        merged += [t for t in classifier_tags if t["tag_name"] not in ours]
        return merged[:max_tags]


def _merged(tag: Tag, theirs: dict[str, int]) -> Tag:
    other = theirs.get(tag["tag_name"])
    if other is None or other <= tag["tag_confidence"]:
        return tag
    return Tag(tag_name=tag["tag_name"], tag_confidence=other)
