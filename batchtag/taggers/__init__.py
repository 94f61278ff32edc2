"""Taggers: turn decoded images into the API's tag list.

A tagger is synchronous and CPU-bound. The server works with it in two places:

1. ``prepare(image)`` (optional) runs once per request in the server's decode thread pool,
   in the same call as the image decode, so requests prepare in parallel with each other
   and with the model. It turns the decoded RGB image into whatever the tagger's batch step
   wants (the model: its normalised input tensor). It must be thread-safe and may raise; a
   failure answers only that request (code 201).
2. ``tag_batch(items)`` runs on the batcher's single tagger thread with the items of several
   concurrent requests, so one model call serves many requests. ``items`` are what
   ``prepare`` returned or, for a tagger without ``prepare``, the decoded images themselves.

Keep ``tag_batch`` to the part that really gains from batching: per-image work belongs in
``prepare``, where it does not hold up the other requests of the batch. Unless nothing would
be left to batch: each batch costs a hop to the tagger thread, so a tagger whose whole work
is per image (the color tagger) is cheaper without ``prepare``.

The model tagger is built from stages (``STAGES``), so an evaluation can compare the
classifier alone, each stage added, and the final tagger, on the same photos::

    load_tagger("model", "en", stages={"classifier"}, min_confidence=0)              # classifier alone
    load_tagger("model", "en", stages={"classifier", "detector"}, min_confidence=0)  # + detector
    load_tagger("model", "en")                                                       # the default
    load_tagger("model", "en", stages={"classifier", "blazeface"}, int8=False, min_confidence=0)
                                                         # the default before issue 18

- ``classifier``: EfficientNet-Lite0 on ImageNet-1k (INT8 unless ``int8=False``) +
  ``data/imagenet_rules.csv`` (breeds, foods, scenes, objects);
- ``detector``: YOLOX-nano, 80 COCO classes + ``data/coco_rules.csv`` (people, animals,
  vehicles, everyday objects); its person boxes count people for ``data/people.toml``;
- ``faces`` (not a default): CenterFace, small faces in groups, for the people rules (合影 /
  人群); with the detector on, it runs only on photos where the detector saw 3+ people;
- ``blazeface``: the face stage before issue 18 (BlazeFace), kept for comparison.

``min_confidence`` (0..100, default ``DEFAULT_MIN_CONFIDENCE``) drops every tag below it from
the answer; 0 returns everything the stages found (for measuring). The same default is the
threshold of ``export`` and ``report``, so sidecars and reports show what the API answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

if TYPE_CHECKING:  # the CLI reads TAGGERS and LANGS before anything heavy is loaded
    from PIL import Image


class Tag(TypedDict):
    tag_name: str
    tag_confidence: int  # 0..100


class Tagger(Protocol):
    name: str
    # The smallest short side the tagger needs; decoders may reduce down to it (JPEG draft
    # mode, whole-factor reduce) but not below.
    # None means "full resolution is fine and cheap" (no draft).
    input_size: int | None
    max_batch: int

    # Optional, so not declared here (a Protocol cannot make a method optional):
    #     def prepare(self, image: Image.Image) -> Any: ...
    # See the module docstring; ``preparer`` finds it.

    def tag_batch(self, items: list[Any]) -> list[list[Tag]]: ...


def preparer(tagger: Tagger) -> Callable[[Image.Image], Any] | None:
    """The tagger's ``prepare`` method, or None when it has none (it takes images as they are)."""
    prepare = getattr(tagger, "prepare", None)
    return prepare if callable(prepare) else None


# The one list of each: the CLI's choices, RunConfig's and ServeConfig's checks read these.
TAGGERS = ("model", "color")
LANGS = ("zh", "en")
# The model tagger's stages, and the ones it runs unless told otherwise (see the docstring).
STAGES = ("classifier", "detector", "faces", "blazeface")
# "faces" (CenterFace) is not a default: on the evaluation set it changed neither recall nor
# precision once the detector's person boxes count people, for 16 % more CPU a photo.
DEFAULT_STAGES = frozenset({"classifier", "detector"})
# Tags below this confidence are not returned by default (serve, run, export, report). Set on
# the tuning half of bench/quality (python -m bench.quality): the final tagger's highest F1 is
# at 21 (recall 0.61, precision 0.92 there; held-out 0.56 / 0.85); tags scoring 10-19 were
# right half of the time, 20-29 three times in four, 30 and up 0.76-1.00 per band.
DEFAULT_MIN_CONFIDENCE = 21


def confidence(share: float) -> int:
    """The API's 0..100 integer confidence of a probability or share in 0..1."""
    return max(0, min(100, round(100.0 * share)))


def check_stages(stages: Iterable[str]) -> frozenset[str]:
    """The model tagger's stage set, validated: known names, and the classifier always in."""
    chosen = frozenset(stages)
    unknown = sorted(chosen - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if "classifier" not in chosen:
        raise ValueError("the classifier stage is always needed (the other stages add to its tags)")
    return chosen


def parse_stages(text: str | None) -> frozenset[str] | None:
    """``--stages classifier,detector`` as a checked set; None or empty: the defaults."""
    if not text:
        return None
    return check_stages(name.strip() for name in text.split(",") if name.strip())


def check_min_confidence(value: int) -> int:
    """A minimum confidence is a whole number 0..100, as the API's confidences are."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ValueError(f"min confidence must be a whole number 0..100, got {value!r}")
    return value


def above(tags: list[Tag], min_confidence: int) -> list[Tag]:
    """The tags at or above ``min_confidence`` (the one place the threshold is applied)."""
    return [t for t in tags if t["tag_confidence"] >= min_confidence]


def load_tagger(
    name: str,
    lang: str = "zh",
    faces: bool = True,
    stages: Iterable[str] | None = None,
    min_confidence: int = DEFAULT_MIN_CONFIDENCE,
    int8: bool = True,
) -> Tagger:
    """Build the tagger ``batchtag serve --tagger NAME --lang LANG`` uses.

    ``stages`` picks the model tagger's stages (default ``DEFAULT_STAGES``); ``faces=False``
    (``serve --no-faces``) takes the face stages out of them. ``int8=False``: the float classifier. ``min_confidence``: see the
    module docstring (the color tagger, a demo of the API, has no stages and no threshold).
    """
    if name == "color":
        from batchtag.taggers.color import ColorTagger

        return ColorTagger(lang=lang)
    if name == "model":
        from batchtag.taggers.model import ModelTagger

        chosen = check_stages(DEFAULT_STAGES if stages is None else stages)
        if not faces:
            chosen -= {"faces", "blazeface"}
        return ModelTagger(
            lang=lang, stages=chosen, min_confidence=check_min_confidence(min_confidence), int8=int8
        )
    raise ValueError(f"unknown tagger {name!r}; choose one of {', '.join(TAGGERS)}")
