"""Taggers: turn decoded images into the API's tag list.

A tagger is synchronous and CPU-bound. The server works with it in two places:

1. ``prepare(image)`` (optional) runs once per request in the server's decode thread pool,
   in the same call as the image decode, so requests prepare in parallel with each other
   and with the model. It turns the decoded RGB image into whatever the tagger's batch step
   wants (the model: each stage's input, and the INT8 classifier's answer, which gains
   nothing from batching). It must be thread-safe and may raise; a
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

from collections.abc import Iterable

from batchtag.taggers.base import (
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_STAGES,
    LANGS,
    STAGES,
    TAGGERS,
    Tag,
    Tagger,
    above,
    check_min_confidence,
    check_stages,
    confidence,
    parse_stages,
    preparer,
    resolve_stages,
)

__all__ = [
    "DEFAULT_MIN_CONFIDENCE",
    "DEFAULT_STAGES",
    "LANGS",
    "STAGES",
    "TAGGERS",
    "Tag",
    "Tagger",
    "above",
    "check_min_confidence",
    "check_stages",
    "confidence",
    "load_tagger",
    "parse_stages",
    "preparer",
]


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

        return ModelTagger(
            lang=lang,
            stages=resolve_stages(stages, faces),
            min_confidence=check_min_confidence(min_confidence),
            int8=int8,
        )
    raise ValueError(f"unknown tagger {name!r}; choose one of {', '.join(TAGGERS)}")
