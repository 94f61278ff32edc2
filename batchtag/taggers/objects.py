"""Objects in a photo: YOLOX-nano (COCO, 80 classes) on ONNX Runtime, and its rules.

The network is Megvii's YOLOX-nano as exported to ONNX in Kazuhito00/YOLOX-ONNX-TFLite-Sample
(Apache-2.0, ``data/OBJECT-MODEL-LICENSE.md``); ``scripts/export_object_model.py`` makes its
fixed 1x3x416x416 input dynamic (batch and size: the network is fully convolutional), checks
the checksum of the original and the parity of the edit, and records reference outputs.

What the network sees (YOLOX's own preprocessing): the photo letterboxed into a square of
``size`` pixels at the top left (aspect kept, the rest grey 114), channels in BGR order,
values 0..255 as float32. Its output is (N, anchors, 85): box centre/size offsets on a grid
of strides 8, 16 and 32, objectness, and 80 class scores (both already sigmoids).

A tag needs only which classes are present and how sure the network is, plus the people's
boxes for counting, so decoding keeps per photo: the best score of each class, and the person
boxes after non-maximum suppression.
"""

from __future__ import annotations

import csv
import io
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
DEFAULT_SIZE = 320
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


def letterbox(image: Image.Image, size: int) -> tuple[np.ndarray, float]:
    """(3, size, size) uint8 BGR input for one RGB photo, and the photo-to-input scale."""
    width, height = image.size
    scale = size / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = image.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    # Channel first and BGR straight from Pillow's bands: a contiguous array, so neither the
    # channel flip here nor the batch's stacking copies through a transposed view (half of
    # this function's CPU outside the resize, the same pixels).
    canvas = np.full((3, size, size), PAD_VALUE, dtype=np.uint8)
    for channel, band in enumerate(reversed(resized.split())):
        canvas[channel, :h, :w] = np.asarray(band)
    return canvas, scale


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each output row's grid cell (x, y) and stride, in the network's output order."""
    cells, strides = [], []
    for stride in STRIDES:
        n = size // stride
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        strides.append(np.full(n * n, stride))
    return np.concatenate(cells).astype(np.float32), np.concatenate(strides).astype(np.float32)[:, None]


class ObjectDetector:
    """YOLOX-nano behind an ONNX Runtime CPU session (thread-safe, like the classifier)."""

    def __init__(
        self,
        model_path: Path | None = None,
        size: int = DEFAULT_SIZE,
        threads: int = 1,
        box_floor: float = 0.25,
        nms_iou: float = 0.45,
    ) -> None:
        """Load the model; ``size`` is the input side (a multiple of 32).

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
        self._cells, self._strides = grid(size)
        self.session = cpu_session(self.model_path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def prepare(self, image: Image.Image) -> tuple[np.ndarray, float]:
        """The letterboxed input of one RGB photo and its scale (thread-safe)."""
        return letterbox(image, self.size)

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """The network's output (N, anchors, 85) for a uint8 or float (N, 3, size, size) batch."""
        (out,) = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return out

    def raw_of(self, inputs: list[np.ndarray]) -> np.ndarray:
        """``raw`` of a list of (3, size, size) uint8 inputs, made float32 in one pass into the
        batch (no uint8 stack copied again to float)."""
        batch = np.empty((len(inputs), *inputs[0].shape), dtype=np.float32)
        for row, pixels in zip(batch, inputs, strict=True):
            row[...] = pixels
        return self.raw(batch)

    def detect(
        self, inputs: list[tuple[np.ndarray, float]], sizes: list[tuple[int, int]]
    ) -> list[Detections]:
        """Detections per photo: one network call for the batch; ``sizes`` are the photos' (w, h)."""
        if not inputs:
            return []
        out = self.raw_of([pixels for pixels, _ in inputs])
        return [
            self._decode(rows, scale, size) for rows, (_, scale), size in zip(out, inputs, sizes, strict=True)
        ]

    def _decode(self, rows: np.ndarray, scale: float, size: tuple[int, int]) -> Detections:
        scores = rows[:, 4:5] * rows[:, 5:]
        person = scores[:, PERSON]
        keep = np.flatnonzero(person >= self.box_floor)
        persons: list[Face] = []
        if keep.size:
            centre = (rows[keep, 0:2] + self._cells[keep]) * self._strides[keep]
            half = np.exp(rows[keep, 2:4]) * self._strides[keep] / 2.0
            boxes = np.concatenate([centre - half, centre + half], axis=1).astype(np.float64) / scale
            boxes /= np.array([size[0], size[1], size[0], size[1]], dtype=np.float64)
            persons = weighted_nms(boxes, person[keep].astype(np.float64), self.nms_iou)
        return Detections(scores.max(axis=0), persons)
