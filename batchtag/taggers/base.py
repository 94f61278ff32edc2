"""What every tagger is (the ``Tagger`` protocol, ``Tag``), the one list of taggers and
languages, and ``confidence``; the contract itself is drawn in ``batchtag.taggers``.
Apart from the package so that the taggers can import it without a cycle."""

from __future__ import annotations

from collections.abc import Callable
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


def confidence(share: float) -> int:
    """The API's 0..100 integer confidence of a probability or share in 0..1."""
    return max(0, min(100, round(100.0 * share)))
