"""Objects in a photo: YOLOX-nano (COCO, 80 classes) on ONNX Runtime, and its rules.

The network is Megvii's YOLOX-nano as exported to ONNX in Kazuhito00/YOLOX-ONNX-TFLite-Sample
(Apache-2.0, ``data/OBJECT-MODEL-LICENSE.md``); ``scripts/export_object_model.py`` makes its
fixed 1x3x416x416 input dynamic (batch and size: the network is fully convolutional), checks
the checksum of the original and the parity of the edit, and records reference outputs.

What the network sees (YOLOX's own preprocessing, but not its square): the photo resized so
its long side is ``size`` pixels, at the top left of an input whose sides are rounded up to a
multiple of 32 (320 x 256 for a 4:3 photo; the rest grey 114), channels in BGR order, values
0..255 as float32. Photos of the same input shape share a network call, at most ``chunk`` of
them. Its output is (N, anchors, 85): box centre/size offsets on a grid
of strides 8, 16 and 32, objectness, and 80 class scores (both already sigmoids).

A tag needs only which classes are present and how sure the network is, plus the people's
boxes for counting, so decoding keeps per photo: the best score of each class, and the person
boxes after non-maximum suppression.
"""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from batchtag.taggers.faces import REDUCING_GAP, Face, weighted_nms
from batchtag.taggers.runtime import cpu_session

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "data" / "yolox_nano.onnx"
STRIDES = (8, 16, 32)
PAD_VALUE = 114
NUM_CLASSES = 80
PERSON = 0  # COCO class index of "person"
# The input side. The final tagger's recall / precision on the evaluation set's tuning half
# (bench/quality) with the first people rules, at 256 / 320 / 352 / 384 / 416 px: .614 / .912,
# .614 / .923, .619 / .913, .608 / .911, .636 / .915; with today's rules at 256 / 288 / 320:
# .619 / .911, .619 / .925, .642 / .925. 416 px found ~4 more of 170 things for 1.7x the
# detector's CPU. 256 px would bring the default back to the old default's cost (bench section
# `stages`), but on the test photos it lost a crowd's people, saw a person beside a dog and a
# cow in a horse; 75 of the 100 persons found at 416 px on COCO photos, against 92 at 320.
# Those were 320 px squares; since issue 18's speed work the input keeps the photo's aspect
# (320 x 256 for the evaluation set's 4:3 photos): 0.8x the detector's CPU (3.45 against
# 4.3 ms a photo at chunk 4), and on the evaluation set, re-tuned on the tuning half (the
# default min confidence stays 21, the COCO thresholds 0.4: 0.41 was one tag better on the
# tuning half, the same on the held-out one), tuning .642 / .931 (was .642 / .925), held-out
# .575 / .856 (was .581 / .855); 10 tag names of 132 photos flipped, 5 of them right.
DEFAULT_SIZE = 320
# At most this many photos a network call: at 4 the activations stay in the CPU's cache. CPU a
# photo at 1 / 2 / 4 / 8 / 16 a call: 320 x 320 4.3 / 4.3 / 4.3 / 4.6 / 4.9 ms, 320 x 256
# 3.4 / 3.5 / 3.45 / 3.6 / 3.8 ms (one thread, same outputs).
DEFAULT_CHUNK = 4
RULE_COLUMNS = ("index", "coco_name", "label_en", "label_zh", "threshold", "categories")


@dataclass(frozen=True)
class Detections:
    """What one photo's detector run leaves for the tags.

    ``class_scores``: (80,) the best score (objectness x class) of each COCO class anywhere in
    the photo; ``persons``: the person boxes (photo coordinates 0..1) at or above the
    detector's box floor, strongest first, overlaps merged.
    """

    class_scores: np.ndarray
    persons: list[Face]


@dataclass(frozen=True)
class CocoRule:
    """One row of ``data/coco_rules.csv``: what a COCO class means to a person."""

    index: int
    coco_name: str
    label_en: str
    label_zh: str
    threshold: float
    categories: tuple[str, ...]

    def label(self, lang: str) -> str:
        return self.label_zh if lang == "zh" else self.label_en


def read_coco_rules(known_categories: set[str], path: Path | None = None) -> list[CocoRule]:
    """Parse and check ``coco_rules.csv``: one row per class 0..79, known categories only."""
    source = path or resources.files("batchtag.taggers").joinpath("data", "coco_rules.csv")
    text = source.read_text(encoding="utf-8")
    rows = [row for row in csv.DictReader(io.StringIO(text)) if not row["index"].startswith("#")]
    rules = []
    for line, row in enumerate(rows, start=2):
        where = f"{source}:{line}"
        missing = [c for c in RULE_COLUMNS if not (row.get(c) or "").strip()]
        if missing:
            raise ValueError(f"{where}: empty {', '.join(missing)}")
        cats = tuple(c.strip() for c in row["categories"].split(";") if c.strip())
        unknown = sorted(set(cats) - known_categories)
        if unknown:
            raise ValueError(f"{where}: unknown category id(s) {', '.join(unknown)}")
        threshold = float(row["threshold"])
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"{where}: threshold {threshold} must be in (0, 1]")
        rules.append(
            CocoRule(int(row["index"]), row["coco_name"], row["label_en"], row["label_zh"], threshold, cats)
        )
    if [r.index for r in rules] != list(range(NUM_CLASSES)):
        raise ValueError(f"{source}: expected one row per class 0..{NUM_CLASSES - 1}, in order")
    return rules


def input_shape(width: int, height: int, size: int) -> tuple[int, int, float]:
    """(input width, input height, photo-to-input scale): the photo's long side becomes ``size``
    and each side of the input is the resized side rounded up to a multiple of 32 (the
    network's largest stride), so a 4:3 photo gets 320 x 256 instead of a 320 px square."""
    scale = size / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    return -(-w // STRIDES[-1]) * STRIDES[-1], -(-h // STRIDES[-1]) * STRIDES[-1], scale


def letterbox(image: Image.Image, size: int, square: bool = False) -> tuple[np.ndarray, float]:
    """(3, H, W) uint8 BGR input for one RGB photo (``input_shape``; ``square``: ``size`` x
    ``size``, as YOLOX itself letterboxes), and the photo-to-input scale."""
    width, height = image.size
    in_w, in_h, scale = input_shape(width, height, size)
    if square:
        in_w = in_h = size
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = image.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    # Channel first and BGR straight from Pillow's bands: a contiguous array, so neither the
    # channel flip here nor the batch's stacking copies through a transposed view (half of
    # this function's CPU outside the resize, the same pixels).
    canvas = np.full((3, in_h, in_w), PAD_VALUE, dtype=np.uint8)
    for channel, band in enumerate(reversed(resized.split())):
        canvas[channel, :h, :w] = np.asarray(band)
    return canvas, scale


@functools.cache
def grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each output row's grid cell (x, y) and stride for an input of this shape, in the
    network's output order (rows first); cached, as photos come in a few shapes."""
    cells, strides = [], []
    for stride in STRIDES:
        rows, cols = height // stride, width // stride
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        strides.append(np.full(rows * cols, stride))
    return np.concatenate(cells).astype(np.float32), np.concatenate(strides).astype(np.float32)[:, None]


def by_shape(inputs: Sequence[np.ndarray], chunk: int) -> list[list[int]]:
    """Indexes of ``inputs`` grouped by array shape, in runs of at most ``chunk``: one network
    call each, so a photo's scores never depend on which other photos share its batch."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, pixels in enumerate(inputs):
        groups.setdefault(pixels.shape, []).append(index)
    return [g[i : i + chunk] for g in groups.values() for i in range(0, len(g), chunk)]


class ObjectDetector:
    """YOLOX-nano behind an ONNX Runtime CPU session (thread-safe, like the classifier)."""

    def __init__(
        self,
        model_path: Path | None = None,
        size: int = DEFAULT_SIZE,
        threads: int = 1,
        box_floor: float = 0.25,
        nms_iou: float = 0.45,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        """Load the model; ``size`` is the input's long side (a multiple of 32); ``chunk``: at
        most this many photos a network call.

        ``box_floor``: a person box below this score is not kept for counting (class scores are
        kept whatever they are; the rules' thresholds decide about tags).
        """
        if size % 32 or size < 64:
            raise ValueError(f"detector input size must be a multiple of 32 and >= 64, got {size}")
        self.model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"object model not found at {self.model_path}; regenerate it with scripts/export_object_model.py"
            )
        self.size = size
        self.box_floor = box_floor
        self.nms_iou = nms_iou
        self.chunk = chunk
        self.session = cpu_session(self.model_path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def prepare(self, image: Image.Image) -> tuple[np.ndarray, float]:
        """The letterboxed input of one RGB photo and its scale (thread-safe)."""
        return letterbox(image, self.size)

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """The network's output (N, anchors, 85) for a uint8 or float (N, 3, H, W) batch."""
        (out,) = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return out

    def raw_of(self, inputs: list[np.ndarray]) -> np.ndarray:
        """``raw`` of a list of same-shape (3, H, W) uint8 inputs, made float32 in one pass into the
        batch (no uint8 stack copied again to float)."""
        batch = np.empty((len(inputs), *inputs[0].shape), dtype=np.float32)
        for row, pixels in zip(batch, inputs, strict=True):
            row[...] = pixels
        return self.raw(batch)

    def detect(
        self, inputs: list[tuple[np.ndarray, float]], sizes: list[tuple[int, int]]
    ) -> list[Detections]:
        """Detections per photo, a network call per shape and chunk; ``sizes`` are the photos' (w, h)."""
        found: list[Detections | None] = [None] * len(inputs)
        for group in by_shape([pixels for pixels, _ in inputs], self.chunk):
            out = self.raw_of([inputs[i][0] for i in group])
            for rows, i in zip(out, group, strict=True):
                found[i] = self._decode(rows, inputs[i][1], sizes[i], inputs[i][0].shape)
        return [d for d in found if d is not None]

    def _decode(
        self, rows: np.ndarray, scale: float, size: tuple[int, int], shape: tuple[int, ...]
    ) -> Detections:
        cells, strides = grid(shape[-2], shape[-1])
        scores = rows[:, 4:5] * rows[:, 5:]
        person = scores[:, PERSON]
        keep = np.flatnonzero(person >= self.box_floor)
        persons: list[Face] = []
        if keep.size:
            centre = (rows[keep, 0:2] + cells[keep]) * strides[keep]
            half = np.exp(rows[keep, 2:4]) * strides[keep] / 2.0
            boxes = np.concatenate([centre - half, centre + half], axis=1).astype(np.float64) / scale
            boxes /= np.array([size[0], size[1], size[0], size[1]], dtype=np.float64)
            persons = weighted_nms(boxes, person[keep].astype(np.float64), self.nms_iou)
        return Detections(scores.max(axis=0), persons)
