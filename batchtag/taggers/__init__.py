"""Taggers: turn decoded images into the API's tag list.

A tagger is synchronous and CPU-bound; the server calls ``tag_batch`` from a worker
thread with several images gathered from concurrent requests, so one model call serves
many requests.
"""

from __future__ import annotations

from typing import Protocol, TypedDict

from PIL import Image


class Tag(TypedDict):
    tag_name: str
    tag_confidence: int  # 0..100


class Tagger(Protocol):
    name: str
    # The smallest side the tagger needs; decoders may use JPEG draft mode down to it.
    # None means "full resolution is fine and cheap" (no draft).
    input_size: int | None
    max_batch: int

    def tag_batch(self, images: list[Image.Image]) -> list[list[Tag]]: ...


TAGGERS = ("model", "color")
LANGS = ("zh", "en")


def load_tagger(name: str, lang: str = "zh") -> Tagger:
    """Build the tagger ``batchtag serve --tagger NAME --lang LANG`` uses."""
    if name == "color":
        from batchtag.taggers.color import ColorTagger

        return ColorTagger(lang=lang)
    if name == "model":
        from batchtag.taggers.model import ModelTagger

        return ModelTagger(lang=lang)
    raise ValueError(f"unknown tagger {name!r}; choose one of {', '.join(TAGGERS)}")
