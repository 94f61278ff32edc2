"""EfficientNet-Lite0 ImageNet classifier run with ONNX Runtime on the CPU.

The network is exported once from PyTorch by ``scripts/export_model.py`` into
``data/efficientnet_lite0.onnx``; at run time only ``onnxruntime``, numpy and Pillow are needed
(no torch, nothing downloaded). See ``data/MODEL-LICENSE.md`` for where the weights come from.

Preprocessing (must match the torch reference in ``scripts/export_model.py`` exactly, which the
export script and ``tests/test_imagenet_model.py`` check):

1. convert to 8-bit RGB (``to_rgb``: grey, palette, CMYK, ... via ``Image.convert("RGB")``, alpha
   dropped; 16-bit grey is scaled down to 8 bits first, which ``convert`` would saturate);
2. resize with Pillow's bicubic filter so the *shorter* side is ``RESIZE_SIZE`` (256) and the
   longer side is ``RESIZE_SIZE * long // short`` (floor, like torchvision's ``Resize(256)``);
3. centre-crop ``INPUT_SIZE`` x ``INPUT_SIZE`` (224), offsets ``round((side - 224) / 2)`` like
   torchvision's ``CenterCrop`` (steps 2 and 3 are done as one resample of just the crop,
   see ``crop_pixels``);
4. normalise ``(x - 127) / 128`` on the 0..255 values, channel-first float32.

Why these choices: 224/256 = 0.875 is the same crop fraction as the TensorFlow EfficientNet eval
pipeline (centre crop ``224 / (224 + 32)`` of the shorter side, bicubic resize). The
``(x - 127) / 128`` normalisation is what Google's EfficientNet-Lite models were trained with
("inception-style" mean/std for better post-quantisation, ``MEAN_RGB = 127``,
``STDDEV_RGB = 128`` in ``efficientnet_lite_builder.py``); the PyTorch port converts the TF
checkpoint without folding that in. Using the ImageNet mean/std instead still gives plausible
labels (batch norm hides a lot) but measurably lower confidence on the example photos.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from batchtag.taggers.rules import NUM_CLASSES  # ImageNet-1k: the class count lives with the class rules
from batchtag.taggers.runtime import cpu_session

INPUT_SIZE = 224
"""Side of the square network input."""

RESIZE_SIZE = 256
"""Shorter side after resizing, before the centre crop. Also the smallest shorter side a
decoder may reduce an image to (JPEG draft mode) without changing what the model sees much."""


DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "data" / "efficientnet_lite0.onnx"

# (x - MEAN) / STD on 0..255 values; 1/128 is a power of two, so this is exact in float32.
MEAN = 127.0
STD = 128.0


def _available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row maximum so large logits cannot overflow."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB version of ``img``.

    Pillow's ``convert("RGB")`` clamps 16-bit grey values instead of scaling them, so a 16-bit
    PNG/TIFF would come out almost white; those are shifted down to 8 bits first. Mode "I"
    (32-bit int, which is how older Pillow versions open 16-bit PNGs) is treated as 16-bit when
    any value exceeds 255.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if img.mode in _SIXTEEN_BIT_MODES or arr.max(initial=0) > 255:
            arr = arr >> 8
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))  # mode "L"
    return img.convert("RGB")


class ImageNetClassifier:
    """EfficientNet-Lite0 (ImageNet-1k, 1000 classes) behind an ONNX Runtime CPU session.

    ``predict`` is safe to call from several threads at once (ONNX Runtime sessions are), but
    each call already uses ``threads`` cores, so callers gain more by batching images than by
    running calls in parallel.
    """

    def __init__(self, model_path: Path | None = None, threads: int | None = None) -> None:
        """Load the ONNX model.

        ``threads`` is ONNX Runtime's intra-op thread count; by default one per available core
        (2 on the target machine), the fastest setting for batch inference measured by
        ``scripts/export_model.py``. Inter-op parallelism stays at 1: the graph is a straight chain
        of convolutions, so a second pool would only add context switches.
        """
        self.model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"ONNX model not found at {self.model_path}; regenerate it with scripts/export_model.py"
            )
        self.threads = threads if threads is not None else _available_cores()
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

        self.session = cpu_session(self.model_path, self.threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    @staticmethod
    def preprocess(img: Image.Image) -> np.ndarray:
        """Turn a PIL image into the (3, 224, 224) float32 network input (see module docstring)."""
        return ImageNetClassifier.normalize(ImageNetClassifier.crop_pixels(img))

    @staticmethod
    def crop_pixels(img: Image.Image) -> np.ndarray:
        """The resized centre crop as (3, 224, 224) uint8, channel first: steps 1-3 of the
        module docstring. A quarter of the float input's bytes, so it is what waits in the
        server's batch queue; ``normalize`` makes the network input from a whole batch."""
        img = to_rgb(img)
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ValueError(f"empty image {w}x{h}")
        # Integer arithmetic so this never disagrees with the reference by a float rounding.
        if w <= h:
            new_w, new_h = RESIZE_SIZE, RESIZE_SIZE * h // w
        else:
            new_w, new_h = RESIZE_SIZE * w // h, RESIZE_SIZE
        left = round((new_w - INPUT_SIZE) / 2)
        top = round((new_h - INPUT_SIZE) / 2)
        # Only the crop is resampled: Pillow's ``box`` maps the 224 x 224 output onto the same
        # source coordinates as resizing the whole image to (new_w, new_h) and cropping, at
        # (224/256)^2 of the work and with bounded memory for any aspect ratio. It may run the
        # vertical pass first, so a few pixels can differ by one grey level from resize-then-crop
        # (measured on the example photos at three scales; mean difference < 0.001).
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + INPUT_SIZE) * sx, (top + INPUT_SIZE) * sy)
        out = img.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC, box=box)
        return np.stack([np.asarray(band) for band in out.split()])

    @staticmethod
    def normalize(pixels: np.ndarray) -> np.ndarray:
        """``(x - 127) / 128`` as float32, for one (3, 224, 224) uint8 crop or a batch of them:
        two passes over contiguous memory, done once a batch."""
        out = np.subtract(pixels, np.float32(MEAN), dtype=np.float32)
        out *= np.float32(1.0 / STD)
        return out

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (N, 1000) float32, for a (N, 3, 224, 224) float32 batch.

        Softmax is applied here rather than in the graph so the exported model keeps raw logits,
        which is what the parity check against torch compares.
        """
        if batch.ndim != 4 or batch.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"expected a (N, 3, {INPUT_SIZE}, {INPUT_SIZE}) batch, got {batch.shape}")
        if batch.shape[0] == 0:
            return np.empty((0, NUM_CLASSES), dtype=np.float32)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        (logits,) = self.session.run([self.output_name], {self.input_name: batch})
        return _softmax(np.asarray(logits, dtype=np.float32))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw (N, 1000) logits, for comparing against the torch reference."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        (out,) = self.session.run([self.output_name], {self.input_name: batch})
        return np.asarray(out, dtype=np.float32)

    def classify(self, images: list[Image.Image]) -> np.ndarray:
        """Preprocess, stack and predict in one call: (len(images), 1000) probabilities."""
        if not images:
            return np.empty((0, NUM_CLASSES), dtype=np.float32)
        return self.predict(np.stack([self.preprocess(img) for img in images]))
