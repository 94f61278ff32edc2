"""INT8 EfficientNet-Lite0 for the model tagger's classifier stage, and its agreement with float.

Run once, by hand, from the worktree's venv (onnxruntime's quantization tools need ``onnx``:
``.venv/bin/pip install onnx``)::

    .venv/bin/python scripts/quantize_classifier.py --photos DIR [--photos DIR ...]

Static quantization (ONNX Runtime ``quantize_static``): QDQ format, weights int8 per channel,
activations uint8 with MinMax ranges from calibration photos. The photos used for
``data/efficientnet_lite0_int8.onnx``: the 100 COCO images in ``representative_dataset/`` of
Kazuhito00/YOLOX-ONNX-TFLite-Sample at 3d4f111 (the repository's own set for quantizing), in
name order: the first half calibrates, the second half measures agreement; they are not part
of batchtag. Agreement is printed (and asserted): the float model's top-1 class must be in the
INT8 model's top 5 on at least 99 % of the held-out photos.

Why only the classifier: the same quantization of YOLOX-nano (depthwise convolutions,
unnormalised 0..255 input) lost 40 % of the classes the float model finds on the same photos
at any input size, with the detector head kept in float or only its convolutions quantized,
and gained only 1.1-1.3x in speed; the detector stays float (numbers in bench/README.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batchtag.taggers.imagenet import ImageNetClassifier  # noqa: E402

DATA = REPO / "batchtag" / "taggers" / "data"
SOURCE = DATA / "efficientnet_lite0.onnx"
OUTPUT = DATA / "efficientnet_lite0_int8.onnx"
MIN_TOP5_AGREEMENT = 0.99
FIXTURE = REPO / "tests" / "data" / "classifier_int8_reference.npz"
FIXTURE_SEED = 18  # the fixture's input is regenerated from this seed, only the outputs are stored


def reference_input() -> np.ndarray:
    """(2, 3, 224, 224) float32 standard normal: a normalised-image-like input, from a seed."""
    return np.random.default_rng(FIXTURE_SEED).standard_normal((2, 3, 224, 224), dtype=np.float32)


def record_reference(model: ImageNetClassifier) -> None:
    """The INT8 model's logits on ``reference_input``, for tests/test_stages.py's parity test."""
    np.savez_compressed(FIXTURE, seed=FIXTURE_SEED, logits=model.logits(reference_input()))


class Photos(CalibrationDataReader):
    """The calibration photos as the classifier's normalised input, one at a time."""

    def __init__(self, classifier: ImageNetClassifier, input_name: str, photos: list[Path]) -> None:
        self.classifier = classifier
        self.input_name = input_name
        self.photos = iter(photos)

    def get_next(self) -> dict[str, np.ndarray] | None:
        path = next(self.photos, None)
        if path is None:
            return None
        with Image.open(path) as image:
            pixels = self.classifier.crop_pixels(image.convert("RGB"))
        return {self.input_name: self.classifier.normalize(pixels[None])}


def agreement(
    float_model: ImageNetClassifier, int8_model: ImageNetClassifier, photos: list[Path]
) -> dict[str, float]:
    """Top-1 equal, float top-1 in INT8 top-5, and the mean top-5 overlap."""
    pixels = []
    for path in photos:
        with Image.open(path) as image:
            pixels.append(float_model.crop_pixels(image.convert("RGB")))
    batch = np.stack(pixels)
    a = np.argsort(-float_model.predict(float_model.normalize(batch)), axis=1)[:, :5]
    b = np.argsort(-int8_model.predict(int8_model.normalize(batch)), axis=1)[:, :5]
    return {
        "top1_same": float(np.mean(a[:, 0] == b[:, 0])),
        "float_top1_in_int8_top5": float(np.mean([x[0] in y for x, y in zip(a, b, strict=True)])),
        "top5_overlap": float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(a, b, strict=True)])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, action="append", required=True, help="a directory of JPEGs")
    args = parser.parse_args(argv)
    photos = sorted(p for d in args.photos for p in d.glob("*.jpg"))
    if len(photos) < 20:
        raise SystemExit(f"{len(photos)} photos: too few to calibrate and check (need 20 or more)")
    half = len(photos) // 2
    calibrate, held_out = photos[:half], photos[half:]
    classifier = ImageNetClassifier()
    input_name = classifier.session.get_inputs()[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "pre.onnx"
        quant_pre_process(str(SOURCE), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(OUTPUT),
            Photos(classifier, input_name, calibrate),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    quantized = ImageNetClassifier(model_path=OUTPUT)
    record_reference(quantized)
    result = agreement(classifier, quantized, held_out)
    print(
        f"wrote {OUTPUT}; on {len(held_out)} held-out photos: "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.items())
    )
    if result["float_top1_in_int8_top5"] < MIN_TOP5_AGREEMENT:
        print(f"agreement below {MIN_TOP5_AGREEMENT}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
