"""Run the embedded ``model`` tagger over the evaluation set, one configuration at a time.

Configurations: the classifier alone, the classifier with each other stage, and the final
tagger (the default stages). Each runs in this process with the server's own decode, prepare
and batch calls, in English, and with no minimum confidence, so tags below any threshold are
seen here and the threshold is applied by the scoring.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.quality.dataset import HALVES, KINDS, PEOPLE_TAGS, PHOTOS, Photo, Vocabulary
from bench.quality.score import Score, Tags, bands, choose_threshold, misses, mostly_wrong_below, score

LANG = "en"
THRESHOLD_RULE = "the highest F1 on the tuning half (ties: the higher threshold)"


@dataclass(frozen=True)
class Config:
    """A way to build the model tagger: ``stages`` None means its defaults; ``faces`` is the
    older switch (``--no-faces``), for a tagger without stage sets."""

    name: str
    stages: frozenset[str] | None = None
    faces: bool = True
    float_classifier: bool = False  # the classifier before INT8 quantization (``int8=False``)


def configurations() -> list[Config]:
    """The classifier alone, the classifier with each other stage, and the final tagger.

    Read from the tagger's own list of stages when it has one (``taggers.STAGES``); a tagger
    without it has one optional stage, the faces (``faces=False`` leaves it out).
    """
    from batchtag import taggers

    stages: Sequence[str] | None = getattr(taggers, "STAGES", None)
    if stages is None:
        return [Config("classifier alone", faces=False), Config("final: classifier + faces")]
    base = stages[0]  # the classifier: the stage every set has
    default = frozenset(getattr(taggers, "DEFAULT_STAGES", stages))
    configs = [Config(f"{base} alone", frozenset({base}))]
    configs += [Config(f"{base} + {s}", frozenset({base, s})) for s in stages[1:]]
    configs = [c for c in configs if c.stages != default]
    ordered = [s for s in stages if s in default]
    return [*before_issue_18(stages), *configs, Config(f"final: {' + '.join(ordered)}")]


def before_issue_18(stages: Sequence[str]) -> list[Config]:
    """The default before issue 18 (the float classifier and the BlazeFace face stage), where
    the tagger can still be built that way: the baseline the new stages are compared with."""
    from batchtag.taggers import load_tagger

    if "blazeface" not in stages or "int8" not in inspect.signature(load_tagger).parameters:
        return []
    old = frozenset({stages[0], "blazeface"})
    return [Config("before: float classifier + blazeface", old, float_classifier=True)]


def default_min_confidence() -> int | None:
    """The tagger's default minimum confidence, where it has one."""
    from batchtag import taggers

    value = getattr(taggers, "DEFAULT_MIN_CONFIDENCE", None)
    return value if isinstance(value, int) else None


def build_tagger(config: Config) -> Any:
    """The model tagger of ``config``, in English, returning every tag it finds."""
    from batchtag.taggers import load_tagger

    options: dict[str, Any] = {"faces": config.faces}
    accepted = inspect.signature(load_tagger).parameters
    if config.stages is not None:
        options["stages"] = config.stages
    if "min_confidence" in accepted:
        options["min_confidence"] = 0
    if config.float_classifier:
        options["int8"] = False
    return load_tagger("model", LANG, **options)


def tag_photos(tagger: Any, paths: Sequence[Path]) -> dict[str, Tags]:
    """Each photo's tags, through the server's decode (with its limits for this tagger), the
    tagger's prepare and its batches."""
    from batchtag.server.config import ServeConfig
    from batchtag.server.imaging import decode_image
    from batchtag.server.service import create_state
    from batchtag.taggers import preparer

    limits = create_state(ServeConfig(tagger="model"), tagger).limits
    prepare = preparer(tagger)
    tagged: dict[str, Tags] = {}
    for start in range(0, len(paths), tagger.max_batch):
        batch = paths[start : start + tagger.max_batch]
        items = []
        for path in batch:
            image = decode_image(path.read_bytes(), limits)
            items.append(prepare(image) if prepare else image)
        for path, tags in zip(batch, tagger.tag_batch(items), strict=True):
            tagged[path.name] = [(t["tag_name"], t["tag_confidence"]) for t in tags]
    return tagged


@dataclass
class Result:
    """One configuration's numbers."""

    config: str
    threshold: int  # chosen on the tuning half
    everything: dict[str, Score]  # per half, every tag (threshold 0)
    chosen: dict[str, Score]  # per half, at the chosen threshold
    at_default: dict[str, Score] = field(default_factory=dict)  # per half, at the default
    bands: list[tuple[int, int, int]] = field(default_factory=list)  # tuning half
    missed: dict[str, int] = field(default_factory=dict)  # held-out, at the chosen threshold
    wrong: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, Score] = field(default_factory=dict)  # held-out, at the chosen threshold
    people: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # per half: people_tags


def evaluate(
    config: Config,
    photos: Sequence[Photo],
    vocabulary: Vocabulary,
    photo_dir: Path = PHOTOS,
    default: int | None = None,
) -> Result:
    """Tag ``photos`` with ``config``, choose its threshold on the tuning half and score both."""
    tagged = tag_photos(build_tagger(config), [photo_dir / p.name for p in photos])
    return judge_config(config.name, photos, tagged, vocabulary, default)


def judge_config(
    name: str, photos: Sequence[Photo], tagged: dict[str, Tags], vocabulary: Vocabulary, default: int | None
) -> Result:
    halves = {half: [p for p in photos if p.half == half] for half in HALVES}
    threshold = choose_threshold(halves["tune"], tagged, vocabulary)
    missed, wrong = misses(halves["held-out"], tagged, threshold, vocabulary)
    return Result(
        config=name,
        threshold=threshold,
        everything={h: score(ps, tagged, 0, vocabulary) for h, ps in halves.items()},
        chosen={h: score(ps, tagged, threshold, vocabulary) for h, ps in halves.items()},
        at_default=(
            {h: score(ps, tagged, default, vocabulary) for h, ps in halves.items()}
            if default is not None
            else {}
        ),
        bands=bands(halves["tune"], tagged, vocabulary),
        missed=missed,
        wrong=wrong,
        people={h: people_tags(ps, tagged, threshold, vocabulary) for h, ps in halves.items()},
        by_kind={
            kind: score([p for p in halves["held-out"] if p.kind == kind], tagged, threshold, vocabulary)
            for kind in KINDS
        },
    )


def people_tags(
    photos: Sequence[Photo], tagged: dict[str, Tags], threshold: int, vocabulary: Vocabulary
) -> dict[str, tuple[int, int]]:
    """Per expected people tag and people class ("group photo in group"): (photos where it was
    returned, photos that expect it); and per people tag, how often it came, wrongly, on a photo
    without people as a subject ("person without people": tiny figures a label calls fair do
    not count)."""
    counts: dict[str, tuple[int, int]] = {}
    names = {tag for expected, fair in PEOPLE_TAGS.values() for tag in (*expected, *fair)}
    for photo in photos:
        returned = {vocabulary.canonical(n) for n, c in tagged[photo.name] if c >= threshold}
        if photo.people is None:
            for tag in sorted(names):
                name = vocabulary.canonical(tag)
                found, total = counts.get(f"{tag} without people", (0, 0))
                counts[f"{tag} without people"] = (found + (name in returned - photo.right), total + 1)
            continue
        for tag in PEOPLE_TAGS[photo.people][0]:
            key = f"{tag} in {photo.people}"
            found, total = counts.get(key, (0, 0))
            counts[key] = (found + (vocabulary.canonical(tag) in returned), total + 1)
    return counts


# --- the report ------------------------------------------------------------------------------


def fmt(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}"


def pair(s: Score) -> str:
    return f"{fmt(s.recall)} / {fmt(s.precision)}"


def results_table(results: Sequence[Result], default: int | None) -> list[str]:
    """Markdown: recall / precision per configuration and half."""
    head = (
        "| configuration | all tags: tuning | all tags: held-out | threshold (tuning) "
        "| at it: tuning | at it: **held-out** |"
    )
    rule = "|---|---:|---:|---:|---:|---:|"
    if default is not None:
        head += f" default ({default}): tuning | default ({default}): held-out |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in results:
        cells = [
            r.config,
            pair(r.everything["tune"]),
            pair(r.everything["held-out"]),
            str(r.threshold),
            pair(r.chosen["tune"]),
            f"**{pair(r.chosen['held-out'])}**",
        ]
        if default is not None:
            cells += [pair(r.at_default["tune"]), pair(r.at_default["held-out"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def counts_table(photos: Sequence[Photo]) -> list[str]:
    """Markdown: photos by kind and people class, per half."""
    lines = ["| | " + " | ".join(KINDS) + " | total |", "|---|" + "---:|" * (len(KINDS) + 1)]
    for half in HALVES:
        mine = [p for p in photos if p.half == half]
        cells = [str(sum(1 for p in mine if p.kind == k)) for k in KINDS]
        lines.append(f"| {half} | " + " | ".join(cells) + f" | {len(mine)} |")
    people = ", ".join(f"{c}: {sum(1 for p in photos if p.people == c)}" for c in PEOPLE_TAGS)
    none = sum(1 for p in photos if p.people is None)
    things = sum(len(p.things) for p in photos)
    lines += ["", f"People classes: {people}; no people as a subject: {none}. Labelled things: {things}."]
    return lines


def bands_table(results: Sequence[Result]) -> list[str]:
    """Markdown: share of right tags per confidence band (tuning half), per configuration."""
    starts = sorted({start for r in results for start, _, _ in r.bands})
    lines = [
        "| configuration | " + " | ".join(f"{s}-{s + 9 if s < 90 else 100}" for s in starts) + " |",
        "|---|" + "---:|" * len(starts),
    ]
    for r in results:
        by_start = {start: (right, total) for start, right, total in r.bands}
        cells = []
        for s in starts:
            right, total = by_start.get(s, (0, 0))
            cells.append(f"{right / total:.2f} ({total})" if total else "—")
        lines.append(f"| {r.config} | " + " | ".join(cells) + " |")
    lines += [
        "",
        *(f"- {r.config}: {mostly_wrong(r)}" for r in results),
    ]
    return lines


def mostly_wrong(result: Result) -> str:
    floor = mostly_wrong_below(result.bands)
    if floor:
        return f"tags below {floor} are mostly wrong (fewer right than wrong in some band below)"
    return "no band holds more wrong tags than right ones"


def kinds_table(results: Sequence[Result]) -> list[str]:
    """Markdown: recall / precision per kind of photo (held-out half, chosen threshold)."""
    lines = ["| configuration | " + " | ".join(KINDS) + " |", "|---|" + "---:|" * len(KINDS)]
    for r in results:
        lines.append(f"| {r.config} | " + " | ".join(pair(r.by_kind[k]) for k in KINDS) + " |")
    return lines


def people_table(results: Sequence[Result], half: str) -> list[str]:
    """Markdown: how often each people tag came where expected (and where not) in ``half``."""
    keys = sorted({k for r in results for k in r.people[half]}, key=lambda k: ("without" in k, k))
    lines = ["| configuration | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for r in results:
        counts = r.people[half]
        cells = [f"{counts[k][0]}/{counts[k][1]}" if k in counts else "—" for k in keys]
        lines.append(f"| {r.config} | " + " | ".join(cells) + " |")
    return lines


def top(counts: dict[str, int], n: int = 12) -> str:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return ", ".join(f"{name} {count}" for name, count in ranked) or "none"


def report(results: Sequence[Result], photos: Sequence[Photo], default: int | None) -> str:
    """The whole markdown report (bench/results/quality.md)."""
    lines = [
        "# Tag quality on the evaluation set (bench/quality)",
        "",
        f"{len(photos)} photos (bench/quality/SOURCES.md), labelled by looking at them "
        "(bench/quality/labels.toml); the embedded `model` tagger in English, every tag returned "
        "(no minimum confidence) and the threshold applied here. Each cell: **recall / precision** "
        "(recall: share of labelled things found; precision: share of returned tags that are "
        f"right). Threshold rule: {THRESHOLD_RULE}; the held-out half is only reported.",
        "",
        *results_table(results, default),
        "",
        "## Photos",
        "",
        *counts_table(photos),
        "",
        "## By kind of photo (held-out half, at the chosen threshold; recall / precision)",
        "",
        *kinds_table(results),
        "",
        "## People tags (at the chosen threshold): photos with the tag / photos",
        "",
        "Without people: photos with no people as a subject where the tag came wrongly.",
        "",
        "Held-out half:",
        "",
        *people_table(results, "held-out"),
        "",
        "Tuning half:",
        "",
        *people_table(results, "tune"),
        "",
        "## Share of right tags by confidence (tuning half; tags in the band)",
        "",
        *bands_table(results),
        "",
        "## Held-out half at the chosen threshold: what was missed and what was wrong",
        "",
    ]
    for r in results:
        lines += [f"- {r.config}: missed {top(r.missed)}; wrong {top(r.wrong)}"]
    return "\n".join(lines) + "\n"


def run_all(
    photos: Sequence[Photo],
    vocabulary: Vocabulary,
    configs: Iterable[Config] | None = None,
    photo_dir: Path = PHOTOS,
) -> tuple[list[Result], int | None]:
    default = default_min_confidence()
    chosen = configurations() if configs is None else list(configs)
    return [evaluate(c, photos, vocabulary, photo_dir, default) for c in chosen], default
