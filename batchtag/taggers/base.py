"""What every tagger is (the ``Tagger`` protocol, ``Tag``), the one list of taggers and
languages, and ``confidence``; the contract itself is drawn in ``batchtag.taggers``.
Apart from the package so that the taggers can import it without a cycle."""

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
# precision once the detector's person boxes count people (held-out precision 0.3 points
# lower since the detector's input keeps the photo's aspect), for 16 % more CPU a photo.
DEFAULT_STAGES = frozenset({"classifier", "detector"})
# Tags below this confidence are not returned by default (serve, run, export, report). Set on
# the tuning half of bench/quality (python -m bench.quality): the final tagger's highest F1 is
# at 21 (recall 0.64, precision 0.93 there; held-out 0.57 / 0.86); tags scoring 10-19 were
# right half of the time, 20-29 three times in four, 30 and up 0.82-1.00 per band. Chosen
# again, the same, when the detector's input took the photo's aspect (objects.DEFAULT_SIZE).
DEFAULT_MIN_CONFIDENCE = 21
# ``--stages``'s help, the same for run and serve.
STAGES_HELP = (
    f"model tagger stages, comma-separated, from {','.join(STAGES)} "
    f"(default: {','.join(s for s in STAGES if s in DEFAULT_STAGES)}; blazeface is the face stage "
    "of earlier versions, kept for comparison)"
)


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


def resolve_stages(stages: Iterable[str] | None, faces: bool = True) -> frozenset[str]:
    """The stages a model tagger runs: the chosen ones (default ``DEFAULT_STAGES``), less the
    face stages under ``--no-faces``."""
    chosen = check_stages(DEFAULT_STAGES if stages is None else stages)
    return chosen - {"faces", "blazeface"} if not faces else chosen


def model_choice(stages: Iterable[str] | None, faces: bool = True, int8: bool = True) -> str | None:
    """What a run's model tagger does otherwise than the default, as records name it in their
    settings, so a rerun with other stages is a settings change. None for the default: records
    made with it keep the settings they always had, and older OUTs resume as before."""
    chosen = resolve_stages(stages, faces)
    parts = []
    if chosen != DEFAULT_STAGES:
        parts.append("stages " + ",".join(name for name in STAGES if name in chosen))
    if not int8:
        parts.append("float classifier")
    return "; ".join(parts) or None


def check_min_confidence(value: int) -> int:
    """A minimum confidence is a whole number 0..100, as the API's confidences are."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ValueError(f"min confidence must be a whole number 0..100, got {value!r}")
    return value


def above(tags: list[Tag], min_confidence: int) -> list[Tag]:
    """The tags at or above ``min_confidence`` (the one place the threshold is applied)."""
    return [t for t in tags if t["tag_confidence"] >= min_confidence]
