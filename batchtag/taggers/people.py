"""Faces and person boxes to people tags (人物, 合影, 人像, 人群), from ``people.toml``.

The rules are data: each tag names what it counts (faces from the face stage, or person boxes
from the object detector), their score floor and size range, and how many it needs; the
thresholds sit next to the scores they were chosen from in ``data/people.toml``. Several
``[[tag]]`` entries may give the same name (人物 from a face, 人物 from a person box): the
photo gets it once, with the best of their confidences. ``PeopleRules.merge`` puts the people tags in front of the classifier's
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


@dataclass(frozen=True)
class CenterFaceSettings:
    """The ``faces`` stage's knobs (``[centerface]`` in ``people.toml``, with their reasons)."""

    min_score: float = 0.5  # a heatmap peak below this is not a face
    nms_iou: float = 0.3  # boxes overlapping more than this are one face
    min_persons: int = 2  # with the detector on, faces are looked for only from this many people


TAG_KEYS = frozenset(
    {
        "id",
        "label_en",
        "label_zh",
        "source",
        "min_score",
        "min_faces",
        "max_faces",
        "min_face_area",
        "max_face_area",
    }
)
SOURCES = ("faces", "persons")


@dataclass(frozen=True)
class PeopleTag:
    """One ``[[tag]]`` of ``people.toml``.

    Counted boxes (faces, or person boxes when ``source`` is "persons"): score >= ``min_score``
    and ``min_face_area`` <= box area <= ``max_face_area`` (shares of the photo). The tag
    applies when ``min_faces`` <= count <= ``max_faces``; its confidence is the score of the
    ``min_faces``-th strongest counted box, the weakest one it needed.
    """

    id: str
    label_en: str
    label_zh: str
    min_score: float
    min_faces: int = 1
    max_faces: int | None = None
    min_face_area: float = 0.0
    max_face_area: float = 1.0
    source: str = "faces"

    def label(self, lang: str) -> str:
        return self.label_zh if lang == "zh" else self.label_en

    def confidence(self, faces: Sequence[Face]) -> float | None:
        """The tag's score for a photo's faces (strongest first), or None when it does not apply."""
        counted = [
            f.score
            for f in faces
            if f.score >= self.min_score and self.min_face_area <= f.area <= self.max_face_area
        ]
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
    source = table.get("source", "faces")
    if source not in SOURCES:
        raise ValueError(f"{where}: source must be one of {', '.join(SOURCES)}, got {source!r}")
    return PeopleTag(
        source=source,
        max_face_area=_fraction(table, "max_face_area", where, 1.0),
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


def parse_centerface(table: dict[str, Any], where: str) -> CenterFaceSettings:
    known = {f.name for f in fields(CenterFaceSettings)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for key in ("min_score", "nms_iou"):
        if key in table:
            values[key] = _fraction(table, key, where)
    if "min_persons" in table:
        values["min_persons"] = _count(table, "min_persons", where, 1)
    return CenterFaceSettings(**values)


def _tag(name: str, confidence: float) -> Tag:
    return Tag(tag_name=name, tag_confidence=max(0, min(100, round(100.0 * confidence))))


class PeopleRules:
    """The detector settings and the people tags of ``people.toml``, in one language."""

    def __init__(
        self,
        detector: DetectorSettings,
        tags: Sequence[PeopleTag],
        lang: str = "zh",
        centerface: CenterFaceSettings = CenterFaceSettings(),
    ) -> None:
        if lang not in LANGS:
            raise ValueError(f"unknown lang {lang!r}; choose one of {', '.join(LANGS)}")
        self.detector = detector
        self.centerface = centerface
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
        unknown = sorted(set(data) - {"detector", "centerface", "tag"})
        if unknown:
            raise ValueError(f"{where}: unknown section(s) {', '.join(unknown)}")
        detector = parse_detector(data.get("detector", {}), f"{where} [detector]")
        centerface = parse_centerface(data.get("centerface", {}), f"{where} [centerface]")
        tags = [parse_tag(t, f"{where} [[tag]] #{i + 1}") for i, t in enumerate(data.get("tag", []))]
        if not tags:
            raise ValueError(f"{where}: no [[tag]] entries")
        ids = [t.id for t in tags]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: duplicate tag ids in {ids}")
        return cls(detector, tags, lang, centerface)

    def uses(self, source: str) -> bool:
        """Whether any tag counts boxes of ``source`` (so the stage is worth running for people)."""
        return any(t.source == source for t in self.tags)

    def tags_for(self, faces: Sequence[Face], persons: Sequence[Face] = ()) -> list[Tag]:
        """The people tags one photo's faces and person boxes earn, in file order, each name once."""
        boxes = {"faces": faces, "persons": persons}
        best: dict[str, float] = {}
        for t in self.tags:
            conf = t.confidence(boxes[t.source])
            if conf is not None:
                name = t.label(self.lang)
                best[name] = max(conf, best.get(name, 0.0))
        return [_tag(name, conf) for name, conf in best.items()]

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
