"""The evaluation set (bench/quality) and its harness.

- recall, precision and the threshold choice on a tiny hand-made case, worked out by hand;
- the set cannot silently rot: every photo has a source with a licence and labels, every
  source and label has its photo, the halves stay balanced across kinds;
- the harness runs the real model tagger end to end on a few photos.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from PIL import Image

from bench.quality import dataset
from bench.quality.dataset import HALVES, KINDS, PHOTOS, Vocabulary, load, load_vocabulary, parse_photos
from bench.quality.evaluate import configurations, people_tags, report, run_all
from bench.quality.score import Score, bands, choose_threshold, judge, mostly_wrong_below, score

# --- the scoring, by hand ----------------------------------------------------------------------

VOCABULARY = Vocabulary(
    synonyms={"motorbike": "motorcycle"},
    categories={"dog": frozenset({"animal"}), "motorcycle": frozenset({"vehicle"})},
)
LABELS = {
    "synonyms": {"motorcycle": ["motorbike"]},
    "a.jpg": {"kind": "animals", "half": "tune", "things": ["dog", "pelican|bird"], "also_ok": ["grass"]},
    "b.jpg": {"kind": "vehicles", "half": "held-out", "people": "one", "things": ["motorcycle"]},
}
TAGGED = {
    # dog, bird: things; animal: dog's category; grass: fair; cat: wrong
    "a.jpg": [("dog", 90), ("animal", 80), ("bird", 40), ("cat", 30), ("grass", 10)],
    # motorbike = motorcycle; person: expected for one person; vehicle: its category;
    # group photo: wrong for one person (only "portrait" is fair then); car: wrong
    "b.jpg": [("Motorbike", 70), ("person", 50), ("vehicle", 45), ("group photo", 20), ("car", 15)],
}


@pytest.fixture
def photos() -> list[dataset.Photo]:
    return parse_photos(LABELS, VOCABULARY)


def test_people_class_adds_the_expected_tag(photos: list[dataset.Photo]) -> None:
    b = photos[1]
    assert b.things == (frozenset({"motorcycle"}), frozenset({"person"}))
    assert "portrait" in b.right and "group photo" not in b.right
    assert "vehicle" in b.right  # the category of a labelled thing


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0, Score(found=4, things=4, right=7, returned=10)),
        (41, Score(found=3, things=4, right=5, returned=5)),  # bird (40) drops: pelican|bird missed
        (60, Score(found=2, things=4, right=3, returned=3)),  # person (50) drops too
        (95, Score(found=0, things=4, right=0, returned=0)),
    ],
)
def test_recall_and_precision_by_hand(photos: list[dataset.Photo], threshold: int, expected: Score) -> None:
    total = score(photos, TAGGED, threshold, VOCABULARY)
    assert total == expected
    assert total.recall == expected.found / 4


def test_precision_of_nothing_returned_is_not_a_number(photos: list[dataset.Photo]) -> None:
    assert math.isnan(score(photos, TAGGED, 95, VOCABULARY).precision)
    assert score(photos, TAGGED, 95, VOCABULARY).f1 == 0.0


def test_one_photo_is_judged_alone(photos: list[dataset.Photo]) -> None:
    assert judge(photos[0], TAGGED["a.jpg"], 0, VOCABULARY) == Score(2, 2, 4, 5)


def test_threshold_is_the_best_f1_on_the_tuning_half(photos: list[dataset.Photo]) -> None:
    tuning = [p for p in photos if p.half == "tune"]
    # a.jpg: from 31 to 40 both things are found and every tag is right (F1 = 1): the highest wins
    assert choose_threshold(tuning, TAGGED, VOCABULARY) == 40


def test_confidence_bands_say_below_what_tags_are_mostly_wrong(photos: list[dataset.Photo]) -> None:
    table = bands(photos, TAGGED, VOCABULARY)
    # 10-19: grass (right) car (wrong); 20-29: group photo (wrong); 30-39: cat (wrong); 40-49:
    # bird, vehicle; 50-59: person; 70-79: motorbike; 80-89: animal; 90-100: dog
    assert table == [
        (10, 1, 2),
        (20, 0, 1),
        (30, 0, 1),
        (40, 2, 2),
        (50, 1, 1),
        (70, 1, 1),
        (80, 1, 1),
        (90, 1, 1),
    ]
    assert mostly_wrong_below(table) == 40
    assert mostly_wrong_below([(10, 5, 5)]) == 0


def test_people_tags_are_counted_where_expected_and_where_wrong(photos: list[dataset.Photo]) -> None:
    wrong_person = {**TAGGED, "a.jpg": [*TAGGED["a.jpg"], ("person", 70)]}
    counts = people_tags(photos, wrong_person, 0, VOCABULARY)
    assert counts["person in one"] == (1, 1)
    assert counts["person without people"] == (1, 1)  # a.jpg has no people and no fair "person"
    assert counts["group photo without people"] == (0, 1)
    assert people_tags(photos, TAGGED, 60, VOCABULARY)["person in one"] == (0, 1)  # 50 < 60


def test_a_synonym_given_for_two_names_is_an_error() -> None:
    with pytest.raises(ValueError, match="both"):
        dataset.synonym_table({"sofa": ["couch"], "bench": ["couch"]})


def test_bad_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        parse_photos({"x.jpg": {"kind": "cars", "half": "tune", "things": ["car"]}}, VOCABULARY)
    with pytest.raises(ValueError, match="no things"):
        parse_photos({"x.jpg": {"kind": "indoor", "half": "tune", "things": []}}, VOCABULARY)


def test_categories_come_from_the_rules_data() -> None:
    vocabulary = load_vocabulary({})
    assert {"animal", "mammal", "pet"} <= vocabulary.categories["dog"]
    assert "vehicle" in vocabulary.categories["bus"]
    assert "food" in vocabulary.categories["pizza"]


# --- the set itself ------------------------------------------------------------------------------


def test_every_photo_has_a_source_with_a_licence_and_labels() -> None:
    files = {p.name for p in PHOTOS.glob("*.jpg")}
    sources = dataset.sources()
    photos, _ = load()
    assert len(files) >= 80
    assert files == set(sources), "photos/ and SOURCES.md list different files"
    assert files == {p.name for p in photos}, "photos/ and labels.toml list different files"
    for name, (image, repository, original, licence, kept) in sources.items():
        assert image.startswith("COCO "), name
        assert "/" in repository and "`" in repository, name
        assert original.startswith("http"), name
        assert licence.startswith(("[CC BY", "[No known copyright restrictions")), name
        assert kept, name


def test_photos_are_small_jpegs() -> None:
    for path in PHOTOS.glob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG", path.name
            assert max(image.size) <= 640, path.name
    assert sum(p.stat().st_size for p in PHOTOS.glob("*.jpg")) < 10_000_000


def test_halves_are_balanced_across_kinds() -> None:
    photos, _ = load()
    for kind in KINDS:
        count = Counter(p.half for p in photos if p.kind == kind)
        assert count["tune"] and count["held-out"], kind
        assert abs(count["tune"] - count["held-out"]) <= 1, (kind, count)


# --- the harness, end to end on a few photos -----------------------------------------------------


def test_harness_runs_every_configuration_on_real_photos() -> None:
    photos, vocabulary = load()
    few = [p for half in HALVES for p in [q for q in photos if q.half == half][:2]]
    results, default = run_all(few, vocabulary)
    assert [r.config for r in results] == [c.name for c in configurations()]
    assert "classifier alone" in [r.config for r in results] and results[-1].config.startswith("final")
    for result in results:
        for half in HALVES:
            mine = [p for p in few if p.half == half]
            assert result.everything[half].things == sum(len(p.things) for p in mine)
            assert result.chosen[half].returned <= result.everything[half].returned
        assert 0 <= result.threshold <= 100
        # every tag was seen (no minimum confidence in the tagger): threshold 0 returns the most
        assert result.everything["tune"].returned > 0
    text = report(results, few, default)
    assert all(r.config in text for r in results)
