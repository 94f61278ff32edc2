"""Turn ImageNet-1k class probabilities into the tags people search for.

A classifier trained on ImageNet-1k answers with 1000 fine-grained classes ("Norwich terrier",
"tabby", "espresso"). Nobody searches a photo library for "Norwich terrier", and splitting a dog
photo's probability over 118 breeds makes every single breed look unsure. Following the idea of
PhotoPrism's classify rules, every class is mapped (in ``data/imagenet_rules.csv``) to

* a consumer label in English and Simplified Chinese ("dog" / "狗"), or to no label at all for
  classes that are too misleading to name (e.g. "velvet"),
* a threshold: the probability the label needs before it is emitted,
* broader categories ("animal;mammal;pet;dog"), described in ``data/categories.csv``.

``LabelRules.tags`` sums the probabilities of all classes that share a label, and of all classes
in a category, so a photo split over several breeds still gets a confident "狗" plus "动物".
All the index work is precomputed at load time; tagging is a few numpy operations per batch.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np

from batchtag.taggers.base import LANGS, Tag, confidence

NUM_CLASSES = 1000
DEFAULT_MAX_TAGS = 10
# Below this probability even the single best label is noise, so an image gets no tags at all.
FALLBACK_MIN_PROB = 0.05

RULE_COLUMNS = ("index", "wnid", "imagenet_name", "label_en", "label_zh", "threshold", "categories")
CATEGORY_COLUMNS = ("id", "label_en", "label_zh", "threshold")
_WNID_RE = re.compile(r"^n\d{8}$")

PathLike = str | os.PathLike[str] | Traversable


@dataclass(frozen=True)
class ClassRule:
    """One row of ``imagenet_rules.csv``: what ImageNet class ``index`` means to a person."""

    index: int
    wnid: str
    imagenet_name: str
    label_en: str
    label_zh: str
    threshold: float
    categories: tuple[str, ...]

    def label(self, lang: str) -> str:
        return self.label_zh if lang == "zh" else self.label_en


@dataclass(frozen=True)
class Category:
    """One row of ``categories.csv``: a broad tag such as "animal" / "动物"."""

    id: str
    label_en: str
    label_zh: str
    threshold: float

    def label(self, lang: str) -> str:
        return self.label_zh if lang == "zh" else self.label_en


# --------------------------------------------------------------------------- reading the CSVs


def _data_file(name: str) -> Traversable:
    """The packaged CSV; importlib.resources also works when the package is zipped."""
    return resources.files("batchtag.taggers").joinpath("data", name)


def _read_rows(path: PathLike, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a UTF-8 CSV as (line number, row); a missing column is a ValueError."""
    source = Path(path) if isinstance(path, str | os.PathLike) else path
    text = source.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(columns)}")
    rows = []
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"{path}:{reader.line_num}: wrong number of fields")
        rows.append((reader.line_num, {k: v.strip() for k, v in row.items()}))
    return rows


def _parse_threshold(value: str, where: str) -> float:
    """A threshold is a probability in (0, 1]: 0 would emit the tag on every image."""
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"{where}: threshold {value!r} is not a number") from None
    if not (math.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise ValueError(f"{where}: threshold {threshold} must be in (0, 1]")
    return threshold


def read_categories(path: PathLike) -> dict[str, Category]:
    """Parse and validate ``categories.csv`` into {id: Category}, keeping file order."""
    categories: dict[str, Category] = {}
    for line, row in _read_rows(path, CATEGORY_COLUMNS):
        where = f"{path}:{line}"
        cid = row["id"]
        if not cid:
            raise ValueError(f"{where}: empty category id")
        if cid in categories:
            raise ValueError(f"{where}: duplicate category id {cid!r}")
        if not row["label_en"] or not row["label_zh"]:
            raise ValueError(f"{where}: category {cid!r} needs both label_en and label_zh")
        categories[cid] = Category(
            cid, row["label_en"], row["label_zh"], _parse_threshold(row["threshold"], where)
        )
    if not categories:
        raise ValueError(f"{path}: no categories")
    return categories


def _parse_rule(row: dict[str, str], where: str, known: Iterable[str]) -> ClassRule:
    try:
        index = int(row["index"])
    except ValueError:
        raise ValueError(f"{where}: index {row['index']!r} is not an integer") from None
    if not _WNID_RE.match(row["wnid"]):
        raise ValueError(f"{where}: wnid {row['wnid']!r} is not a WordNet id like n01440764")
    if bool(row["label_en"]) != bool(row["label_zh"]):
        raise ValueError(f"{where}: label_en and label_zh must both be set or both be empty")
    cats = tuple(c.strip() for c in row["categories"].split(";") if c.strip())
    if not cats:
        raise ValueError(f"{where}: class {index} has no categories")
    unknown = sorted(set(cats) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown category id(s) {', '.join(unknown)}")
    return ClassRule(
        index=index,
        wnid=row["wnid"],
        imagenet_name=row["imagenet_name"],
        label_en=row["label_en"],
        label_zh=row["label_zh"],
        threshold=_parse_threshold(row["threshold"], where),
        categories=cats,
    )


def read_class_rules(path: PathLike, categories: dict[str, Category]) -> list[ClassRule]:
    """Parse ``imagenet_rules.csv``; exactly one row per class 0..999, ordered by index.

    A gap or a duplicate would silently shift or drop a class's meaning, so both are errors.
    """
    rules: dict[int, ClassRule] = {}
    for line, row in _read_rows(path, RULE_COLUMNS):
        where = f"{path}:{line}"
        rule = _parse_rule(row, where, categories)
        if not 0 <= rule.index < NUM_CLASSES:
            raise ValueError(f"{where}: index {rule.index} outside 0..{NUM_CLASSES - 1}")
        if rule.index in rules:
            raise ValueError(f"{where}: duplicate row for index {rule.index}")
        rules[rule.index] = rule
    missing = [i for i in range(NUM_CLASSES) if i not in rules]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{path}: expected {NUM_CLASSES} rows (indices 0..{NUM_CLASSES - 1}), "
            f"got {len(rules)}; missing {shown}"
        )
    return [rules[i] for i in range(NUM_CLASSES)]


# --------------------------------------------------------------------------- the index structures


def _label_index(rules: Sequence[ClassRule], lang: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Label names, each class's label id (-1 = no label), and each label's threshold.

    Labels are keyed by their name in ``lang``, so classes that read the same to the user
    ("crocodile" and "alligator" are both 鳄鱼) are pooled. A label's threshold is the minimum of
    its classes' thresholds: the pooled probability is at least that of any member class, so a
    class that would have passed on its own never loses its label by being pooled.
    """
    names: list[str] = []
    ids: dict[str, int] = {}
    class_label = np.full(len(rules), -1, dtype=np.intp)
    thresholds: list[float] = []
    for rule in rules:
        name = rule.label(lang)
        if not name:
            continue
        if name not in ids:
            ids[name] = len(names)
            names.append(name)
            thresholds.append(rule.threshold)
        lid = ids[name]
        class_label[rule.index] = lid
        thresholds[lid] = min(thresholds[lid], rule.threshold)
    return names, class_label, np.asarray(thresholds, dtype=np.float64)


def _category_members(
    rules: Sequence[ClassRule], categories: dict[str, Category]
) -> tuple[np.ndarray, np.ndarray]:
    """(classes, categories): one entry per (class, category) membership, class order."""
    order = {cid: i for i, cid in enumerate(categories)}
    pairs = [(rule.index, order[cid]) for rule in rules for cid in rule.categories]
    classes = np.array([c for c, _ in pairs], dtype=np.intp)
    return classes, np.array([k for _, k in pairs], dtype=np.intp)


def grouped_sums(batch: np.ndarray, columns: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """(rows, n_groups): per row, the sum of ``batch[row, columns[i]]`` into ``groups[i]``:
    one flat bincount with a per-row offset does the whole batch, with no matrix product."""
    n_rows = batch.shape[0]
    bins = (np.arange(n_rows)[:, None] * n_groups + groups[None, :]).ravel()
    sums = np.bincount(bins, weights=batch[:, columns].ravel(), minlength=n_rows * n_groups)
    return sums.reshape(n_rows, n_groups)


# --------------------------------------------------------------------------- the rules


class LabelRules:
    """Aggregates ImageNet-1k probabilities into specific labels and broad categories.

    Build it with :meth:`load`; then :meth:`tags` / :meth:`tags_batch` are pure numpy and safe
    to call from several threads (nothing is mutated after construction).
    """

    def __init__(
        self,
        rules: Sequence[ClassRule],
        categories: dict[str, Category],
        lang: str = "zh",
        max_tags: int = DEFAULT_MAX_TAGS,
    ) -> None:
        if lang not in LANGS:
            raise ValueError(f"unknown lang {lang!r}; choose one of {', '.join(LANGS)}")
        if max_tags < 1:
            raise ValueError(f"max_tags must be at least 1, got {max_tags}")
        self.lang = lang
        self.max_tags = max_tags
        self.rules = tuple(rules)
        self.num_classes = len(self.rules)
        self.label_names, self._class_label, self.label_thresholds = _label_index(self.rules, lang)
        self._labelled = np.flatnonzero(self._class_label >= 0)
        self._labelled_ids = self._class_label[self._labelled]
        self.category_names = [c.label(lang) for c in categories.values()]
        self.category_thresholds = np.asarray([c.threshold for c in categories.values()])
        self._member_classes, self._member_categories = _category_members(self.rules, categories)

    @classmethod
    def load(
        cls,
        lang: str = "zh",
        rules_path: PathLike | None = None,
        categories_path: PathLike | None = None,
        max_tags: int = DEFAULT_MAX_TAGS,
    ) -> LabelRules:
        """Read and validate the CSVs (the packaged ones by default); ValueError if broken."""
        categories = read_categories(categories_path or _data_file("categories.csv"))
        rules = read_class_rules(rules_path or _data_file("imagenet_rules.csv"), categories)
        return cls(rules, categories, lang=lang, max_tags=max_tags)

    # -- scoring ------------------------------------------------------------------------------

    def _as_batch(self, probs: np.ndarray) -> np.ndarray:
        batch = np.asarray(probs, dtype=np.float64)
        if batch.ndim != 2 or batch.shape[1] != self.num_classes:
            raise ValueError(
                f"expected probabilities of shape (batch, {self.num_classes}), got {batch.shape}"
            )
        if not np.isfinite(batch).all():
            raise ValueError("probabilities contain NaN or infinity")
        return batch

    def label_probs(self, probs: np.ndarray) -> np.ndarray:
        """(batch, n_labels): per label, the summed probability of its classes.

        Each class has at most one label, so one flat bincount with a per-row offset does the
        whole batch without a (labels x classes) matrix multiply.
        """
        return grouped_sums(self._as_batch(probs), self._labelled, self._labelled_ids, len(self.label_names))

    def category_probs(self, probs: np.ndarray) -> np.ndarray:
        """(batch, n_categories): per category, the summed probability of its classes, capped at 1.

        A bincount like ``label_probs``, not a matrix product: numpy's BLAS (OpenBLAS) runs
        even this small product on its worker threads, which then spin for a while after
        each call; once a batch, that spinning took 3-4 ms of CPU an image from the decoding
        beside it on two cores (the model tagger's images/s, bench section ``stages``).
        """
        sums = grouped_sums(
            self._as_batch(probs), self._member_classes, self._member_categories, len(self.category_names)
        )
        return np.minimum(sums, 1.0)

    # -- tags ---------------------------------------------------------------------------------

    def tags(self, probs: np.ndarray) -> list[Tag]:
        """Tags for one image's 1000 class probabilities (softmax output)."""
        vector = np.asarray(probs)
        if vector.ndim != 1:
            raise ValueError(f"expected one probability vector of shape ({self.num_classes},)")
        return self.tags_batch(vector[None, :])[0]

    def tags_batch(self, probs: np.ndarray) -> list[list[Tag]]:
        """Tags for each row of a (batch, 1000) probability array.

        Per image: specific labels that reach their threshold, most confident first, then
        categories that reach theirs, most confident first; a name that is both a label and a
        category (狗) appears once, with the higher confidence; at most ``max_tags`` tags. When
        nothing passes, the best label alone if its probability is at least 0.05.
        """
        labels = self.label_probs(probs)
        cats = self.category_probs(probs)
        return [self._row_tags(label_row, cat_row) for label_row, cat_row in zip(labels, cats, strict=True)]

    def parts_batch(self, probs: np.ndarray) -> list[tuple[list[tuple[str, int]], list[tuple[str, int]]]]:
        """Per image, the passing (specific, broad) (name, confidence) lists, before any cut.

        For a tagger that merges these with other stages' tags (``model.py``); ``tags_batch``
        is the classifier's answer on its own.
        """
        labels = self.label_probs(probs)
        cats = self.category_probs(probs)
        return [
            (
                _passing(self.label_names, label_row, self.label_thresholds),
                _passing(self.category_names, cat_row, self.category_thresholds),
            )
            for label_row, cat_row in zip(labels, cats, strict=True)
        ]

    def _row_tags(self, label_row: np.ndarray, cat_row: np.ndarray) -> list[Tag]:
        specific = _passing(self.label_names, label_row, self.label_thresholds)
        broad = _passing(self.category_names, cat_row, self.category_thresholds)
        if not specific and not broad:
            return self._fallback(label_row)
        specific, broad = _drop_duplicate_names(specific, broad)
        ordered = (specific + broad)[: self.max_tags]
        return [Tag(tag_name=name, tag_confidence=conf) for name, conf in ordered]

    def _fallback(self, label_row: np.ndarray) -> list[Tag]:
        """Nothing passed: the best label alone, if it is not pure noise.

        An empty answer looks like a failure to the caller; one honest low-confidence tag is
        more useful, as long as it carries its real (low) confidence.
        """
        if label_row.size == 0:
            return []
        best = int(np.argmax(label_row))
        p = float(label_row[best])
        if p < FALLBACK_MIN_PROB:
            return []
        return [Tag(tag_name=self.label_names[best], tag_confidence=confidence(p))]


def _passing(names: Sequence[str], probs: np.ndarray, thresholds: np.ndarray) -> list[tuple[str, int]]:
    """(name, confidence) for every entry at or above its threshold, most confident first."""
    hits = np.flatnonzero(probs >= thresholds)
    hits = hits[np.argsort(-probs[hits], kind="stable")]
    return [(names[i], confidence(float(probs[i]))) for i in hits]


def _drop_duplicate_names(
    specific: list[tuple[str, int]], broad: list[tuple[str, int]]
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A label and a category may share a name (狗 / 狗); keep the more confident one only.

    Compared on the integer confidence the caller sees, so float noise between the two sums
    cannot flip the choice; ties go to the specific label, which is listed first anyway.
    """
    best_specific = dict(specific)
    best_broad = dict(broad)
    specific = [(n, c) for n, c in specific if not (n in best_broad and best_broad[n] > c)]
    broad = [(n, c) for n, c in broad if not (n in best_specific and best_specific[n] >= c)]
    return specific, broad


def parent_categories() -> dict[str, str]:
    """Each tag name's broad category, in both languages, for hierarchical keywords.

    A class's first category is its top level ("animal;mammal;pet;cat" puts 猫 and 哺乳动物
    under 动物). Names that are a top level themselves, and names the rules do not know (the
    color tagger's), have no entry. When rows disagree, the lowest class index decides.
    """
    categories = read_categories(_data_file("categories.csv"))
    rules = read_class_rules(_data_file("imagenet_rules.csv"), categories)
    parents: dict[str, str] = {}
    for lang in LANGS:
        top = {categories[rule.categories[0]].label(lang) for rule in rules}
        for rule in rules:
            root = categories[rule.categories[0]].label(lang)
            names = [categories[c].label(lang) for c in rule.categories[1:]] + [rule.label(lang)]
            for name in names:
                if name and name not in top:
                    parents.setdefault(name, root)
    return parents
