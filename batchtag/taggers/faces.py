"""Faces in a photo: MediaPipe's BlazeFace short-range detector on ONNX Runtime.

The network is converted once from the TFLite file in the mediapipe 0.10.14 wheel by
``scripts/export_face_model.py`` into ``data/blazeface_short_range.onnx`` (Apache-2.0, see
``data/FACE-MODEL-LICENSE.md``); at run time only onnxruntime, numpy and Pillow are needed.

What the network sees: a 128x128 RGB image scaled to [-1, 1]. A photo is letterboxed into
it whole (aspect kept, black bars), and, when ``tiles`` > 1, also as a grid of overlapping
tiles, each letterboxed the same way: the short-range model finds faces down to about an
eighth of its input, so tiles would let it see faces a few times smaller in the photo.
The per-image work (resizing, ``prepare_views``) runs in the server's decode threads; the
network call and the decoding (``FaceDetector.detect``) take a whole batch at once.

Decoding follows the model's MediaPipe graph: SSD anchors as its anchor calculator builds
them (128x128 input, strides 8, 16, 16, 16, two anchors of fixed unit size per cell: 896),
box centre/size offsets scaled by 128, sigmoid scores (logits clipped to +-100), then
weighted non-maximum suppression (overlapping boxes are averaged, weighted by score). All
views of one photo are mapped back into the photo's coordinates and suppressed together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from batchtag.taggers.runtime import cpu_session

INPUT_SIZE = 128
STRIDES = (8, 16, 16, 16)
ANCHORS_PER_LAYER = 2  # aspect ratio 1.0 plus the interpolated scale, both fixed at unit size
ANCHOR_OFFSET = 0.5
COORD_SCALE = 128.0  # box offsets are in input pixels
LOGIT_CLIP = 100.0
NUM_ANCHORS = 896

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "data" / "blazeface_short_range.onnx"

# Shrink by a whole factor (a cheap box filter) down to twice the target size before the
# bilinear resize: a 1500x1000 decode letterboxes in 1.5 ms instead of 9.5 ms, and the
# detector scores on the example photos move by at most 0.008.
REDUCING_GAP = 2.0


@dataclass(frozen=True)
class DetectorSettings:
    """The detector's knobs; the values in use are in ``data/people.toml`` with their reasons."""

    min_score: float = 0.5  # an anchor below this is never a candidate
    nms_iou: float = 0.3  # boxes overlapping more than this are one face
    max_contained: float = 0.6  # a weaker box this much inside a stronger one is part of it
    tiles: int = 1  # grid side: 1 = the whole photo only; n > 1 adds n x n overlapping tiles
    tile_overlap: float = 0.25  # each tile extends this fraction of its size into its neighbours


@dataclass(frozen=True)
class Face:
    """One face, its box in the photo's coordinates (0..1 on both axes)."""

    score: float
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def area(self) -> float:
        """The share of the photo the box covers (clipped to the photo)."""
        w = min(self.x1, 1.0) - max(self.x0, 0.0)
        h = min(self.y1, 1.0) - max(self.y0, 0.0)
        return max(w, 0.0) * max(h, 0.0)


@dataclass(frozen=True)
class Views:
    """A photo's detector inputs and where each sits in the photo.

    ``images`` is uint8 (V, 3, 128, 128) (a quarter of float32's memory while it waits in the
    batcher's queue); ``transforms`` is float64 (V, 4): ``(ox, oy, sx, sy)`` maps a point
    ``(x, y)`` of view ``v``'s input (0..1) to ``(ox + x * sx, oy + y * sy)`` in the photo.
    """

    images: np.ndarray
    transforms: np.ndarray


def ssd_anchors() -> np.ndarray:
    """(896, 2) anchor centres (x, y) in 0..1, in the order of the model's outputs.

    Layers with the same stride share one feature map, whose cells each get all their anchors
    in a row: 16x16 cells x 2 for stride 8, then 8x8 cells x 6 for the three stride-16 layers.
    """
    centres = []
    layer = 0
    while layer < len(STRIDES):
        stride = STRIDES[layer]
        same = sum(1 for s in STRIDES[layer:] if s == stride)  # consecutive only in practice
        cells = int(np.ceil(INPUT_SIZE / stride))
        per_cell = ANCHORS_PER_LAYER * same
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        grid = np.stack([(xs + ANCHOR_OFFSET) / cells, (ys + ANCHOR_OFFSET) / cells], axis=-1)
        centres.append(np.repeat(grid.reshape(-1, 2), per_cell, axis=0))
        layer += same
    anchors = np.concatenate(centres)
    assert anchors.shape == (NUM_ANCHORS, 2)
    return anchors


ANCHORS = ssd_anchors()


# --------------------------------------------------------------------------- preparing views


def _letterbox(image: Image.Image, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The crop ``box`` of ``image`` letterboxed into the input, and its transform to the photo."""
    left, top, right, bottom = box
    cw, ch = right - left, bottom - top
    scale = INPUT_SIZE / max(cw, ch)
    w, h = max(1, round(cw * scale)), max(1, round(ch * scale))
    pad_x, pad_y = (INPUT_SIZE - w) // 2, (INPUT_SIZE - h) // 2
    resized = image.resize((w, h), Image.Resampling.BILINEAR, box=box, reducing_gap=REDUCING_GAP)
    canvas = np.zeros((INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    canvas[pad_y : pad_y + h, pad_x : pad_x + w] = np.asarray(resized)
    width, height = image.size
    # input pixel p -> crop pixel (p - pad) * cw / w -> photo fraction (left + that) / width
    sx, sy = INPUT_SIZE * cw / w / width, INPUT_SIZE * ch / h / height
    ox, oy = (left - pad_x * cw / w) / width, (top - pad_y * ch / h) / height
    return canvas.transpose(2, 0, 1), np.array([ox, oy, sx, sy])


def tile_boxes(width: int, height: int, tiles: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Pixel boxes of a ``tiles`` x ``tiles`` grid whose tiles overlap their neighbours."""
    boxes = []
    for axis_len in (width, height):
        step = axis_len / tiles
        pad = step * overlap
        boxes.append(
            [
                (max(0, round(i * step - pad)), min(axis_len, round((i + 1) * step + pad)))
                for i in range(tiles)
            ]
        )
    return [(x0, y0, x1, y1) for y0, y1 in boxes[1] for x0, x1 in boxes[0] if x1 > x0 and y1 > y0]


def prepare_views(image: Image.Image, settings: DetectorSettings = DetectorSettings()) -> Views:
    """The detector inputs for one RGB photo: whole, then tiles (thread-safe)."""
    width, height = image.size
    boxes = [(0, 0, width, height)]
    if settings.tiles > 1:
        boxes += tile_boxes(width, height, settings.tiles, settings.tile_overlap)
    views = [_letterbox(image, box) for box in boxes]
    return Views(np.stack([v[0] for v in views]), np.stack([v[1] for v in views]))


def whole_view(image: Image.Image) -> np.ndarray:
    """(1, 3, 128, 128) uint8: the whole photo letterboxed, as the parity fixture stores it."""
    return prepare_views(image).images


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 0..255 to the network's float32 -1..1."""
    return images.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


# --------------------------------------------------------------------------- decoding


def decode_boxes(
    regressors: np.ndarray, logits: np.ndarray, min_score: float
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate boxes (k, 4: x0, y0, x1, y1 in the view's 0..1) and scores of one view."""
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -LOGIT_CLIP, LOGIT_CLIP)))
    keep = np.flatnonzero(scores >= min_score)
    reg = regressors[keep].astype(np.float64) / COORD_SCALE
    centre = reg[:, 0:2] + ANCHORS[keep]
    half = reg[:, 2:4] / 2.0
    return np.concatenate([centre - half, centre + half], axis=1), scores[keep]


def to_photo(boxes: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """View boxes to photo coordinates (see ``Views``)."""
    ox, oy, sx, sy = transform
    return boxes * np.array([sx, sy, sx, sy]) + np.array([ox, oy, ox, oy])


def _overlaps(box: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersection over union, and intersection over each other box's own area."""
    iw = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = iw * ih
    area = (box[2] - box[0]) * (box[3] - box[1])
    other_area = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + other_area - inter
    return inter / np.maximum(union, 1e-12), inter / np.maximum(other_area, 1e-12)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_contained: float = 1.0) -> list[Face]:
    """MediaPipe's weighted non-maximum suppression, strongest face first.

    The strongest remaining box takes every box that overlaps it by more than ``iou``; its
    face is their score-weighted mean box with its own score. A weaker box lying more than
    ``max_contained`` inside it (a partial face from a tile edge) is dropped without averaging.
    """
    order = np.argsort(-scores, kind="stable")
    faces = []
    while order.size:
        top = order[0]
        iou_all, contained = _overlaps(boxes[top], boxes[order])
        group = order[iou_all > iou]
        weights = scores[group]
        merged = (boxes[group] * weights[:, None]).sum(axis=0) / weights.sum()
        faces.append(Face(float(scores[top]), *(float(v) for v in merged)))
        order = order[(iou_all <= iou) & (contained <= max_contained)]
    return faces


# --------------------------------------------------------------------------- the detector


class FaceDetector:
    """BlazeFace short-range behind an ONNX Runtime CPU session (thread-safe, like the classifier)."""

    def __init__(
        self,
        model_path: Path | None = None,
        threads: int = 1,
        settings: DetectorSettings = DetectorSettings(),
    ) -> None:
        """Load the ONNX model.

        One intra-op thread by default: the network is small, so a second thread mostly adds
        synchronisation (measured, batch 16: 1.7 ms CPU a photo on one thread, 2.0 on two), and
        on a busy server the other core is decoding the next requests anyway.
        """
        self.model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"face model not found at {self.model_path}; regenerate it with scripts/export_face_model.py"
            )
        self.settings = settings
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.session = cpu_session(self.model_path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def raw(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The network's outputs for a float32 (N, 3, 128, 128) batch: (N, 896, 16), (N, 896, 1)."""
        regressors, logits = self.session.run(
            ["regressors", "classificators"], {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        )
        return regressors, logits

    def detect(self, photos: list[Views]) -> list[list[Face]]:
        """Faces per photo, strongest first, all views of all photos in one network call."""
        if not photos:
            return []
        counts = [len(v.images) for v in photos]
        regressors, logits = self.raw(normalise(np.concatenate([v.images for v in photos])))
        results, start = [], 0
        s = self.settings
        for views, count in zip(photos, counts, strict=True):
            boxes, scores = [], []
            for i in range(count):
                b, sc = decode_boxes(regressors[start + i], logits[start + i, :, 0], s.min_score)
                boxes.append(to_photo(b, views.transforms[i]))
                scores.append(sc)
            start += count
            results.append(
                weighted_nms(np.concatenate(boxes), np.concatenate(scores), s.nms_iou, s.max_contained)
            )
        return results

    def best_anchor_score(self, views: Views) -> float:
        """The highest anchor score over a photo's views, detected or not (for reports)."""
        _, logits = self.raw(normalise(views.images))
        return float(1.0 / (1.0 + np.exp(-np.clip(logits.max(), -LOGIT_CLIP, LOGIT_CLIP))))
