"""The ImageNet-1k -> consumer label table and the aggregation in batchtag.taggers.rules."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from batchtag.taggers import rules as rules_mod
from batchtag.taggers.rules import NUM_CLASSES, LabelRules, read_categories, read_class_rules

DATA = Path(rules_mod.__file__).parent / "data"
RULES_CSV = DATA / "imagenet_rules.csv"
CATEGORIES_CSV = DATA / "categories.csv"

DOG_BREEDS = range(151, 269)
DOMESTIC_CATS = range(281, 286)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return read_csv(RULES_CSV)


@pytest.fixture(scope="module")
def by_index(rows: list[dict[str, str]]) -> dict[int, dict[str, str]]:
    return {int(r["index"]): r for r in rows}


@pytest.fixture(scope="module")
def zh() -> LabelRules:
    return LabelRules.load("zh")


@pytest.fixture(scope="module")
def en() -> LabelRules:
    return LabelRules.load("en")


def one_hot(mass: dict[int, float]) -> np.ndarray:
    probs = np.zeros(NUM_CLASSES)
    for index, p in mass.items():
        probs[index] = p
    return probs


def names(tags: list[dict]) -> list[str]:
    return [t["tag_name"] for t in tags]


def confidence(tags: list[dict], name: str) -> int:
    return next(t["tag_confidence"] for t in tags if t["tag_name"] == name)


def cats(row: dict[str, str]) -> set[str]:
    return set(row["categories"].split(";"))


# --------------------------------------------------------------------------- the table


def test_every_class_has_exactly_one_row(rows: list[dict[str, str]]) -> None:
    assert [int(r["index"]) for r in rows] == list(range(NUM_CLASSES))
    assert len({r["wnid"] for r in rows}) == NUM_CLASSES


def test_rows_are_complete_and_use_known_categories(rows: list[dict[str, str]]) -> None:
    known = {r["id"] for r in read_csv(CATEGORIES_CSV)}
    for r in rows:
        where = f"class {r['index']} ({r['imagenet_name']})"
        assert r["wnid"].startswith("n") and len(r["wnid"]) == 9, where
        assert r["imagenet_name"], where
        assert bool(r["label_en"]) == bool(r["label_zh"]), where
        assert r["categories"] and cats(r) <= known, where
        assert 0.0 < float(r["threshold"]) <= 1.0, where


def test_standard_imagenet_order(by_index: dict[int, dict[str, str]]) -> None:
    # torchvision / Keras order: line i of timm's imagenet_synsets.txt.
    assert by_index[0]["wnid"] == "n01440764"  # tench
    assert by_index[281]["wnid"] == "n02123045"  # tabby
    assert by_index[504]["wnid"] == "n03063599"  # coffee mug
    assert by_index[967]["wnid"] == "n07920052"  # espresso
    assert by_index[999]["wnid"] == "n15075141"  # toilet tissue


def test_categories_file() -> None:
    cat_rows = read_csv(CATEGORIES_CSV)
    ids = [r["id"] for r in cat_rows]
    assert len(ids) == len(set(ids))
    assert {
        "animal",
        "dog",
        "cat",
        "food",
        "drink",
        "landscape",
        "vehicle",
        "car",
        "person",
        "object",
    } <= set(ids)
    for r in cat_rows:
        assert r["label_en"] and r["label_zh"]
        assert 0.0 < float(r["threshold"]) <= 1.0


def test_chinese_labels_are_chinese(rows: list[dict[str, str]]) -> None:
    for r in rows:
        if r["label_zh"]:
            assert any("\u4e00" <= ch <= "\u9fff" for ch in r["label_zh"]), r


@pytest.mark.parametrize(
    ("index", "label_en", "label_zh", "required"),
    [
        (281, "cat", "猫", {"animal", "cat", "pet"}),
        (504, "cup", "杯子", {"kitchen"}),
        (967, "coffee", "咖啡", {"drink", "food"}),
        (817, "sports car", "跑车", {"car", "vehicle"}),
        (978, "beach", "海滩", {"landscape"}),
        (812, "space shuttle", "航天飞机", {"aircraft"}),
        (207, "dog", "狗", {"animal", "dog", "pet"}),
        (983, "diving", "潜水", {"person"}),
        (954, "banana", "香蕉", {"fruit", "food"}),
    ],
)
def test_spot_checks(
    by_index: dict[int, dict[str, str]], index: int, label_en: str, label_zh: str, required: set[str]
) -> None:
    row = by_index[index]
    assert (row["label_en"], row["label_zh"]) == (label_en, label_zh)
    assert required <= cats(row)


def test_class_groups(by_index: dict[int, dict[str, str]]) -> None:
    for i in DOG_BREEDS:
        assert by_index[i]["label_zh"] == "狗" and {"dog", "animal"} <= cats(by_index[i]), i
    for i in DOMESTIC_CATS:
        assert by_index[i]["label_zh"] == "猫" and {"cat", "animal"} <= cats(by_index[i]), i
    for i in range(0, 398):
        assert "animal" in cats(by_index[i]) or i == 69, i  # 69 trilobite: photos of fossils
    for i in range(948, 958):
        assert {"fruit", "food"} <= cats(by_index[i]), i
    for i in range(970, 981):
        if i != 971:  # 971 is "bubble"
            assert "landscape" in cats(by_index[i]), i
    for i in (981, 982, 983):
        assert "person" in cats(by_index[i]), i
    # Big cats and wolves are animals, not the pets the 猫 / 狗 categories mean.
    for i in (269, 291, 292):
        assert not {"cat", "dog", "pet"} & cats(by_index[i]), i


# --------------------------------------------------------------------------- aggregation


def test_dog_breeds_aggregate(zh: LabelRules) -> None:
    probs = one_hot({207: 0.2, 208: 0.15, 250: 0.1, 151: 0.05})  # each breed alone is unsure
    tags = zh.tags(probs)
    assert names(tags)[0] == "狗"
    assert confidence(tags, "狗") == 50
    assert confidence(tags, "动物") == 50
    assert "宠物" in names(tags)
    assert names(tags).count("狗") == 1  # the 狗 category is not repeated


def test_english(en: LabelRules) -> None:
    tags = en.tags(one_hot({281: 0.4, 282: 0.3, 285: 0.1}))
    assert names(tags)[0] == "cat"
    assert confidence(tags, "cat") == 80
    assert {"animal", "mammal", "pet"} <= set(names(tags))
    assert not any("\u4e00" <= ch <= "\u9fff" for t in tags for ch in t["tag_name"])


def test_specific_labels_come_before_categories(zh: LabelRules) -> None:
    tags = zh.tags(one_hot({967: 0.3, 504: 0.25, 968: 0.2}))
    assert names(tags)[:2] == ["杯子", "咖啡"]  # coffee mug + cup pool into 杯子
    assert confidence(tags, "杯子") == 45
    category_names = set(zh.category_names)
    assert all(n in category_names for n in names(tags)[2:])
    confs = [t["tag_confidence"] for t in tags[2:]]
    assert confs == sorted(confs, reverse=True)


def test_thresholds_suppress_weak_labels(zh: LabelRules) -> None:
    # window screen (904) needs 0.5; at 0.3 it must not be named, though 物品 may still appear.
    tags = zh.tags(one_hot({904: 0.3}))
    assert "纱窗" not in names(tags)
    tags = zh.tags(one_hot({904: 0.6}))
    assert "纱窗" in names(tags)
    # A default-threshold label just below 0.1 is suppressed when a category passes.
    tags = zh.tags(one_hot({292: 0.09, 291: 0.09}))
    assert "老虎" not in names(tags) and "狮子" not in names(tags)
    assert "动物" in names(tags)


def test_label_threshold_is_min_of_its_classes(zh: LabelRules) -> None:
    # 蘑菇: 947 (0.1) and the wild fungi (0.2) share the label; the pooled label uses 0.1.
    threshold = zh.label_thresholds[zh.label_names.index("蘑菇")]
    assert threshold == pytest.approx(0.1)


def test_fallback_best_label(zh: LabelRules) -> None:
    probs = np.full(NUM_CLASSES, 0.0)
    probs[292] = 0.08  # tiger: below every threshold, above the fallback floor
    assert zh.tags(probs) == [{"tag_name": "老虎", "tag_confidence": 8}]
    probs[292] = 0.04
    assert zh.tags(probs) == []


def test_uniform_probabilities_give_no_confident_labels(zh: LabelRules) -> None:
    tags = zh.tags(np.full(NUM_CLASSES, 1.0 / NUM_CLASSES))
    # Only broad categories (which sum many classes) can pass on a flat distribution.
    assert all(n in set(zh.category_names) for n in names(tags))


def test_unlabelled_class_still_gets_categories(zh: LabelRules) -> None:
    tags = zh.tags(one_hot({885: 0.9}))  # velvet: never named, but it is a thing
    assert names(tags) == ["物品"]


def test_max_tags_and_confidence_range() -> None:
    rules = LabelRules.load("zh", max_tags=3)
    rng = np.random.default_rng(7)
    batch = rng.dirichlet(np.full(NUM_CLASSES, 0.02), size=200)
    for tags in rules.tags_batch(batch):
        assert len(tags) <= 3
        assert len(set(names(tags))) == len(tags)
        for t in tags:
            assert isinstance(t["tag_confidence"], int) and 0 <= t["tag_confidence"] <= 100


def test_default_max_tags(zh: LabelRules) -> None:
    # Ten distinct labels at 0.1 each, plus their categories: cut to the ten labels.
    mass = {i: 0.1 for i in (1, 9, 101, 291, 292, 340, 388, 954, 963, 978)}
    tags = zh.tags(one_hot(mass))
    assert len(tags) == 10
    assert set(names(tags)) <= set(zh.label_names)


def test_batch_matches_single(zh: LabelRules) -> None:
    rng = np.random.default_rng(3)
    batch = rng.dirichlet(np.full(NUM_CLASSES, 0.05), size=16)
    assert zh.tags_batch(batch) == [zh.tags(row) for row in batch]


def test_category_sums_are_each_category_s_classes(zh: LabelRules, rows: list[dict[str, str]]) -> None:
    """category_probs (a bincount, not a BLAS product) sums exactly the classes the CSV puts
    in each category, row by row."""
    batch = np.random.default_rng(11).dirichlet(np.full(NUM_CLASSES, 0.05), size=5)
    order = list(read_categories(rules_mod._data_file("categories.csv")))
    expected = np.zeros((len(batch), len(order)))
    for row in rows:
        for cid in cats(row):
            expected[:, order.index(cid)] += batch[:, int(row["index"])]
    np.testing.assert_allclose(zh.category_probs(batch), np.minimum(expected, 1.0), rtol=1e-12, atol=1e-15)


def test_category_confidence_is_capped(zh: LabelRules) -> None:
    probs = one_hot({207: 0.7, 208: 0.6})  # not normalised: still at most 100
    tags = zh.tags(probs)
    assert all(t["tag_confidence"] <= 100 for t in tags)
    assert confidence(tags, "动物") == 100


def test_bad_input_shapes(zh: LabelRules) -> None:
    with pytest.raises(ValueError):
        zh.tags(np.zeros(999))
    with pytest.raises(ValueError):
        zh.tags_batch(np.zeros((2, 10)))
    with pytest.raises(ValueError):
        zh.tags(np.full(NUM_CLASSES, np.nan))


def test_unknown_lang() -> None:
    with pytest.raises(ValueError, match="lang"):
        LabelRules.load("fr")


# --------------------------------------------------------------------------- broken CSVs


def write_rules(tmp_path: Path, rows: list[dict[str, str]]) -> Path:
    path = tmp_path / "rules.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_missing_row_is_rejected(tmp_path: Path, rows: list[dict[str, str]]) -> None:
    path = write_rules(tmp_path, [r for r in rows if r["index"] != "500"])
    with pytest.raises(ValueError, match="missing 500"):
        LabelRules.load(rules_path=path)


def test_duplicate_row_is_rejected(tmp_path: Path, rows: list[dict[str, str]]) -> None:
    path = write_rules(tmp_path, [*rows, rows[3]])
    with pytest.raises(ValueError, match="duplicate"):
        LabelRules.load(rules_path=path)


def test_unknown_category_is_rejected(tmp_path: Path, rows: list[dict[str, str]]) -> None:
    broken = [dict(r) for r in rows]
    broken[10]["categories"] = "animal;dinosaurs"
    with pytest.raises(ValueError, match=r"unknown category id.*dinosaurs"):
        LabelRules.load(rules_path=write_rules(tmp_path, broken))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("threshold", "0", "threshold"),
        ("threshold", "1.5", "threshold"),
        ("threshold", "high", "threshold"),
        ("categories", "", "no categories"),
        ("label_zh", "", "both"),
        ("index", "x", "index"),
        ("index", "1000", "outside"),
    ],
)
def test_bad_field_is_rejected(
    tmp_path: Path, rows: list[dict[str, str]], field: str, value: str, message: str
) -> None:
    broken = [dict(r) for r in rows]
    broken[42][field] = value
    with pytest.raises(ValueError, match=message):
        LabelRules.load(rules_path=write_rules(tmp_path, broken))


def test_missing_column_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "categories.csv"
    path.write_text("id,label_en\nanimal,animal\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing column"):
        read_categories(path)


def test_category_rows_validated(tmp_path: Path) -> None:
    path = tmp_path / "categories.csv"
    path.write_text(
        "id,label_en,label_zh,threshold\nanimal,animal,动物,0.15\nanimal,x,y,0.2\n", encoding="utf-8"
    )
    with pytest.raises(ValueError, match="duplicate category"):
        read_categories(path)


def test_rules_use_the_given_categories(tmp_path: Path) -> None:
    path = tmp_path / "categories.csv"
    path.write_text("id,label_en,label_zh,threshold\nanimal,animal,动物,0.15\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown category"):
        read_class_rules(RULES_CSV, read_categories(path))
