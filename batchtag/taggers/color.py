"""A cheap, deterministic tagger: dominant colours and overall tone.

For load tests and offline demos where the real model is too slow or beside the point.
Each image is shrunk to at most 64x64 and every pixel is named by a hue/saturation/value
rule; a colour's confidence is its share of the pixels. Tone tags come from the mean
luminance (bright/dark) and the mean saturation (black and white).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from batchtag.taggers.base import Tag, confidence

THUMBNAIL_SIDE = 64
MIN_COLOR_SHARE = 0.10  # colours covering less of the image are noise, not "dominant"
MAX_COLOR_TAGS = 3
BRIGHT_LUMA = 0.62
DARK_LUMA = 0.25
GRAYSCALE_SATURATION = 0.06

COLOR_NAMES = (
    "red",
    "orange",
    "yellow",
    "green",
    "cyan",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
)
NAMES: dict[str, dict[str, str]] = {
    "zh": {
        "red": "红",
        "orange": "橙",
        "yellow": "黄",
        "green": "绿",
        "cyan": "青",
        "blue": "蓝",
        "purple": "紫",
        "pink": "粉",
        "brown": "棕",
        "black": "黑",
        "white": "白",
        "gray": "灰",
        "bright": "明亮",
        "dark": "昏暗",
        "black_and_white": "黑白",
    },
    "en": {
        **{name: name for name in COLOR_NAMES},
        "bright": "bright",
        "dark": "dark",
        "black_and_white": "black and white",
    },
}

# Hue bands in degrees: (upper bound, colour) for saturated, reasonably lit pixels.
HUE_BANDS = ((15, "red"), (40, "orange"), (70, "yellow"), (165, "green"), (200, "cyan"), (255, "blue"),
             (320, "purple"), (345, "pink"), (360, "red"))  # fmt: skip


class ColorTagger:
    name = "color"
    # Decode floor: twice the thumbnail, so thumbnail()'s own averaging has pixels to work with.
    input_size: int | None = 2 * THUMBNAIL_SIDE
    # Batching saves this tagger no work (tag_batch loops over the images) and every request
    # of a batch waits for the whole batch, so batches are kept small; 16 was the best
    # compromise measured. No ``prepare``: in the decode threads it left batches of ~1 (a
    # thread hop per request) and cost capacity. Figures: bench/README.md, "Settings".
    max_batch = 16

    def __init__(self, lang: str = "zh") -> None:
        if lang not in NAMES:
            raise ValueError(f"unknown language {lang!r}; choose one of {', '.join(NAMES)}")
        self.lang = lang
        self._names = NAMES[lang]

    def tag_batch(self, images: list[Image.Image]) -> list[list[Tag]]:
        return [self.tag_one(image) for image in images]

    def tag_one(self, image: Image.Image) -> list[Tag]:
        rgb = _thumbnail_rgb(image)
        hsv = np.asarray(rgb.convert("HSV"), dtype=np.float32) / 255.0
        luma = np.asarray(rgb.convert("L"), dtype=np.float32) / 255.0
        scores = _color_shares(hsv)
        scores.update(_tone_scores(float(luma.mean()), float(hsv[..., 1].mean())))
        ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
        return [{"tag_name": self._names[key], "tag_confidence": confidence} for key, confidence in ranked]


def _thumbnail_rgb(image: Image.Image) -> Image.Image:
    small = image.convert("RGB") if image.mode != "RGB" else image.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return small


def _pixel_color_names(hsv: np.ndarray) -> np.ndarray:
    """One colour name per pixel, from hue (degrees), saturation and value in 0..1."""
    hue, sat, val = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    names = np.empty(hue.shape, dtype=object)
    for upper, color in reversed(HUE_BANDS):
        names[hue < upper] = color
    warm = (hue < 40) | (hue >= 345)
    names[warm & (val < 0.66) & (sat > 0.35)] = "brown"
    names[(hue >= 320) & (hue < 345) & (val < 0.6)] = "purple"  # dark magenta reads as purple
    names[((hue < 15) | (hue >= 345)) & (sat < 0.45) & (val > 0.75)] = "pink"  # pale red
    achromatic = sat < 0.18
    names[achromatic] = "gray"
    names[achromatic & (val > 0.85)] = "white"
    names[val < 0.18] = "black"
    return names


def _color_shares(hsv: np.ndarray) -> dict[str, int]:
    names = _pixel_color_names(hsv)
    values, counts = np.unique(names, return_counts=True)
    shares = sorted(zip(counts / names.size, values, strict=True), key=lambda item: (-item[0], item[1]))
    return {
        str(color): confidence(share) for share, color in shares[:MAX_COLOR_TAGS] if share >= MIN_COLOR_SHARE
    }


def _tone_scores(mean_luma: float, mean_saturation: float) -> dict[str, int]:
    scores: dict[str, int] = {}
    if mean_luma >= BRIGHT_LUMA:
        scores["bright"] = confidence(0.5 + (mean_luma - BRIGHT_LUMA) / (1 - BRIGHT_LUMA) / 2)
    elif mean_luma <= DARK_LUMA:
        scores["dark"] = confidence(0.5 + (DARK_LUMA - mean_luma) / DARK_LUMA / 2)
    if mean_saturation <= GRAYSCALE_SATURATION:
        scores["black_and_white"] = confidence(1 - mean_saturation / GRAYSCALE_SATURATION / 2)
    return scores
