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
"""

from __future__ import annotations

from batchtag.taggers.base import LANGS, TAGGERS, Tag, Tagger, confidence, preparer

__all__ = ["LANGS", "TAGGERS", "Tag", "Tagger", "confidence", "load_tagger", "preparer"]


def load_tagger(name: str, lang: str = "zh", faces: bool = True) -> Tagger:
    """Build the tagger ``batchtag serve --tagger NAME --lang LANG`` uses.

    ``faces=False`` (``serve --no-faces``) leaves out the model tagger's people stage.
    """
    if name == "color":
        from batchtag.taggers.color import ColorTagger

        return ColorTagger(lang=lang)
    if name == "model":
        from batchtag.taggers.model import ModelTagger

        return ModelTagger(lang=lang, faces=faces)
    raise ValueError(f"unknown tagger {name!r}; choose one of {', '.join(TAGGERS)}")
