"""Recall and precision of returned tags against the labels, and the threshold choice.

- recall: the share of labelled things found, over all photos (a thing is found when a tag
  at or above the threshold names it or one of its alternatives);
- precision: the share of returned tags (at or above the threshold) that are right: a
  labelled thing, a fair word, a synonym of either, or a category the rules give one of them.

Counts are summed over the photos before dividing, so a photo with many things weighs more
than one with few, as in an archive.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from bench.quality.dataset import Photo, Vocabulary

Tags = Sequence[tuple[str, int]]  # (tag name, confidence 0..100), as the tagger answers
THRESHOLDS = range(0, 101)
BAND = 10  # confidence band width of the "where are tags mostly wrong" table


@dataclass(frozen=True)
class Score:
    found: int = 0  # labelled things found
    things: int = 0  # labelled things
    right: int = 0  # returned tags that are right
    returned: int = 0  # returned tags

    def __add__(self, other: Score) -> Score:
        return Score(
            self.found + other.found,
            self.things + other.things,
            self.right + other.right,
            self.returned + other.returned,
        )

    @property
    def recall(self) -> float:
        return self.found / self.things if self.things else float("nan")

    @property
    def precision(self) -> float:
        """NaN when nothing was returned: no tag, no wrong tag, but no evidence either."""
        return self.right / self.returned if self.returned else float("nan")

    @property
    def f1(self) -> float:
        if not self.found:
            return 0.0
        return 2 * self.recall * self.precision / (self.recall + self.precision)


def judge(photo: Photo, tags: Tags, threshold: int, vocabulary: Vocabulary) -> Score:
    """One photo's score for the tags at or above ``threshold``."""
    names = [vocabulary.canonical(name) for name, confidence in tags if confidence >= threshold]
    returned = set(names)
    found = sum(1 for thing in photo.things if thing & returned)
    right = sum(1 for name in names if name in photo.right)
    return Score(found, len(photo.things), right, len(names))


def score(
    photos: Iterable[Photo], tagged: Mapping[str, Tags], threshold: int, vocabulary: Vocabulary
) -> Score:
    """The summed score of ``photos`` (each must have been tagged)."""
    total = Score()
    for photo in photos:
        total += judge(photo, tagged[photo.name], threshold, vocabulary)
    return total


def choose_threshold(
    photos: Sequence[Photo],
    tagged: Mapping[str, Tags],
    vocabulary: Vocabulary,
    thresholds: Iterable[int] = THRESHOLDS,
) -> int:
    """The threshold with the highest F1 on ``photos`` (the tuning half); on a tie the higher
    one, which returns fewer tags for the same balance of found things and wrong tags."""
    best, best_f1 = 0, -1.0
    for threshold in thresholds:
        f1 = score(photos, tagged, threshold, vocabulary).f1
        if f1 >= best_f1:
            best, best_f1 = threshold, f1
    return best


def bands(
    photos: Iterable[Photo], tagged: Mapping[str, Tags], vocabulary: Vocabulary, width: int = BAND
) -> list[tuple[int, int, int]]:
    """(band start, right tags, returned tags) per confidence band of ``width``: where tags are
    mostly wrong, whatever the threshold."""
    counts: dict[int, list[int]] = {}
    for photo in photos:
        for name, confidence in tagged[photo.name]:
            start = min(confidence, 100 - width) // width * width
            cell = counts.setdefault(start, [0, 0])
            cell[0] += vocabulary.canonical(name) in photo.right
            cell[1] += 1
    return [(start, right, total) for start, (right, total) in sorted(counts.items())]


def misses(
    photos: Iterable[Photo], tagged: Mapping[str, Tags], threshold: int, vocabulary: Vocabulary
) -> tuple[dict[str, int], dict[str, int]]:
    """(labelled names not found, returned names that were wrong), each with its count: what
    to look at next."""
    missed: dict[str, int] = {}
    wrong: dict[str, int] = {}
    for photo in photos:
        names = {vocabulary.canonical(n) for n, c in tagged[photo.name] if c >= threshold}
        for thing in photo.things:
            if not thing & names:
                key = "|".join(sorted(thing))
                missed[key] = missed.get(key, 0) + 1
        for name in names - photo.right:
            wrong[name] = wrong.get(name, 0) + 1
    return missed, wrong


def mostly_wrong_below(table: Sequence[tuple[int, int, int]]) -> int:
    """The lowest band start from which every band holds at least as many right tags as wrong
    ones: the tags below it are mostly wrong (0 when no band is)."""
    floor = 0
    for start, right, total in table:
        if 2 * right < total:
            floor = start + BAND
    return floor
