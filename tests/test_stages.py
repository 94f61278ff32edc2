"""The model tagger's stages (issue 18): each model against its recorded reference outputs, the
stage interface the evaluation harness calls, the rules data, and how stages merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchtag.taggers import DEFAULT_MIN_CONFIDENCE, DEFAULT_STAGES, STAGES, load_tagger, parse_stages
from batchtag.taggers.centerface import CenterFace
from batchtag.taggers.imagenet import ImageNetClassifier
from batchtag.taggers.model import INT8_CLASSIFIER, ModelTagger, ObjectRules, merge_named
from batchtag.taggers.objects import NUM_CLASSES, PAD_VALUE, ObjectDetector, grid, letterbox
from batchtag.taggers.people import PeopleRules

DATA = Path(__file__).parent / "data"
PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "photos"


def photo(name: str) -> Image.Image:
    with Image.open(PHOTOS / name) as image:
        return image.convert("RGB")


# --------------------------------------------------------------------------- parity


def test_object_model_matches_the_original_s_recorded_outputs() -> None:
    """scripts/export_object_model.py saved the original YOLOX-nano's strongest rows."""
    fixture = np.load(DATA / "yolox_parity.npz")
    detector = ObjectDetector(size=416)
    out = detector.raw(fixture["pixels"][None])[0]
    np.testing.assert_allclose(out[fixture["rows"]], fixture["outputs"], rtol=0, atol=1e-3)
    assert out[fixture["rows"][0], 5:].argmax() == 15  # the fixture photo's strongest box: a cat


def test_object_model_takes_any_batch_and_size() -> None:
    detector = ObjectDetector(size=320)
    fixture = np.load(DATA / "yolox_parity.npz")
    square = fixture["pixels"][:, :320, :320]
    one = detector.raw(square[None])
    two = detector.raw(np.stack([square, square]))
    assert one.shape == (1, (40 * 40 + 20 * 20 + 10 * 10), 85)
    np.testing.assert_allclose(two[1], one[0], rtol=0, atol=1e-4)


def test_detector_input_keeps_the_photo_s_aspect() -> None:
    """Long side 320, short side rounded up to a multiple of 32; the photo at the top left,
    grey beyond it; the output rows match the shape's anchor grid."""
    detector = ObjectDetector()
    for size, shape in (
        ((640, 480), (3, 256, 320)),
        ((480, 640), (3, 320, 256)),
        ((500, 500), (3, 320, 320)),
    ):
        pixels, scale = detector.prepare(Image.new("RGB", size, (200, 10, 30)))
        assert pixels.shape == shape and scale == 320 / max(size)
        w, h = round(size[0] * scale), round(size[1] * scale)
        assert (pixels[:, :h, :w] == np.array([30, 10, 200])[:, None, None]).all()  # BGR
        assert (pixels[:, h:, :] == PAD_VALUE).all() and (pixels[:, :, w:] == PAD_VALUE).all()
        cells, _ = grid(shape[1], shape[2])
        assert detector.raw(pixels[None]).shape == (1, len(cells), 85)
    assert detector.prepare(Image.new("RGB", (2000, 90)))[0].shape == (3, 32, 320)
    assert letterbox(Image.new("RGB", (640, 480)), 320, square=True)[0].shape == (3, 320, 320)


def test_detections_do_not_depend_on_the_batch() -> None:
    """Photos of two shapes in one batch, more than a chunk of them: each photo's scores and
    person boxes are those it gets alone (one network call per shape and chunk)."""
    detector = ObjectDetector(chunk=2)
    photos = [photo("astronaut_eileen_collins.jpg"), photo("coffee.jpg"), photo("grace_hopper.jpg")]
    photos += [photos[1].transpose(Image.Transpose.FLIP_LEFT_RIGHT), photos[0].rotate(90)]
    inputs = [detector.prepare(p) for p in photos]
    assert len({pixels.shape for pixels, _ in inputs}) >= 2
    together = detector.detect(inputs, [p.size for p in photos])
    for one, pixels, image in zip(together, inputs, photos, strict=True):
        (alone,) = detector.detect([pixels], [image.size])
        np.testing.assert_allclose(one.class_scores, alone.class_scores, rtol=0, atol=1e-5)
        assert [round(f.score, 4) for f in one.persons] == [round(f.score, 4) for f in alone.persons]
    assert together[0].persons[0].score > 0.8 and together[1].class_scores[41] > 0.4  # person; cup


def test_int8_classifier_answers_in_prepare_as_in_a_batch() -> None:
    """The INT8 classifier runs per photo in prepare (the decode threads); its probabilities
    are the batch's. The float classifier (the default before issue 18) still runs batched."""
    tagger = ModelTagger(lang="en")
    prepared = [tagger.prepare(photo(n)) for n in sorted(p.name for p in PHOTOS.glob("*.jpg"))]
    alone = np.stack([p.probs for p in prepared if p.probs is not None])
    batch = tagger.classifier.predict(tagger.classifier.normalize(np.stack([p.pixels for p in prepared])))
    assert alone.shape == batch.shape
    np.testing.assert_allclose(alone, batch, rtol=0, atol=1e-5)
    assert (
        ModelTagger(lang="en", stages={"classifier"}, int8=False).prepare(photo("coffee.jpg")).probs is None
    )


def test_face_model_matches_its_recorded_heatmap() -> None:
    fixture = np.load(DATA / "centerface_parity.npz")
    heat, _, _ = CenterFace().raw(fixture["pixels"][None].astype(np.float32))
    np.testing.assert_allclose(heat[0, 0], fixture["heatmap"], rtol=0, atol=1e-4)
    assert heat.max() > 0.8  # the astronaut's face


def test_int8_classifier_matches_its_recorded_logits_and_agrees_with_float() -> None:
    fixture = np.load(DATA / "classifier_int8_reference.npz")
    x = np.random.default_rng(int(fixture["seed"])).standard_normal((2, 3, 224, 224), dtype=np.float32)
    int8 = ImageNetClassifier(model_path=INT8_CLASSIFIER)
    got = int8.logits(x)
    # INT8 kernels may round differently on other CPUs: logits within a small margin, same order.
    np.testing.assert_allclose(got, fixture["logits"], rtol=0, atol=0.25)
    assert (got.argmax(1) == fixture["logits"].argmax(1)).all()
    floats = ImageNetClassifier()
    names = sorted(p.name for p in PHOTOS.glob("*.jpg"))
    pixels = np.stack([floats.crop_pixels(photo(n)) for n in names])
    a = floats.predict(floats.normalize(pixels))
    b = int8.predict(int8.normalize(pixels))
    for row_a, row_b in zip(a, b, strict=True):
        assert row_a.argmax() in np.argsort(-row_b)[:5]


# --------------------------------------------------------------------------- the interface


def test_stages_interface_for_the_evaluation_harness() -> None:
    assert STAGES[0] == "classifier" and set(STAGES) >= DEFAULT_STAGES
    tagger = load_tagger("model", "en", stages={"classifier"}, min_confidence=0)
    assert isinstance(tagger, ModelTagger)
    assert tagger.stages == {"classifier"} and tagger.objects is None and tagger.centerface is None
    assert load_tagger("model", "en").stages == DEFAULT_STAGES  # type: ignore[attr-defined]
    assert load_tagger("model", "en").min_confidence == DEFAULT_MIN_CONFIDENCE  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown stage"):
        load_tagger("model", stages={"classifier", "ocr"})
    with pytest.raises(ValueError, match="classifier stage is always needed"):
        load_tagger("model", stages={"detector"})
    with pytest.raises(ValueError, match=r"0\.\.100"):
        load_tagger("model", min_confidence=101)
    assert parse_stages(" classifier , detector ") == {"classifier", "detector"}
    assert parse_stages("") is None


def test_min_confidence_leaves_out_weak_tags_only() -> None:
    everything = load_tagger("model", "en", min_confidence=0)
    default = load_tagger("model", "en")
    image = photo("rocket_falcon9.jpg")  # "building 17" among its tags
    (all_tags,) = everything.tag_batch([everything.prepare(image)])  # type: ignore[attr-defined]
    (kept,) = default.tag_batch([default.prepare(image)])  # type: ignore[attr-defined]
    assert kept == [t for t in all_tags if t["tag_confidence"] >= DEFAULT_MIN_CONFIDENCE]
    assert any(t["tag_confidence"] < DEFAULT_MIN_CONFIDENCE for t in all_tags)  # something was left out


# --------------------------------------------------------------------------- rules and merging


def test_coco_rules_name_every_class_in_both_languages() -> None:
    zh, en = ObjectRules("zh"), ObjectRules("en")
    assert len(zh.names) == len(en.names) == NUM_CLASSES
    assert all(zh.names) and all(en.names)
    assert (zh.names[16], en.names[16]) == ("狗", "dog")
    scores = np.zeros(NUM_CLASSES)
    scores[[16, 23]] = [0.9, 0.45]  # a dog and a giraffe
    specific, broad = en.parts(scores)
    assert specific == [("dog", 90), ("giraffe", 45)]
    assert dict(broad)["animal"] == 90 and dict(broad)["mammal"] == 90


def test_merge_gives_each_name_once_at_its_best_confidence() -> None:
    merged = merge_named([("dog", 80), ("person", 60), ("dog", 91)], [("animal", 95), ("dog", 70)])
    assert merged == [
        {"tag_name": "dog", "tag_confidence": 91},
        {"tag_name": "person", "tag_confidence": 60},
        {"tag_name": "animal", "tag_confidence": 95},
    ]


def test_people_rules_from_faces_and_person_boxes() -> None:
    from batchtag.taggers.faces import Face

    rules = PeopleRules.load("en")
    big = [Face(0.95, 0.0, 0.0, 1.0, 0.9)]  # one person filling the frame
    small = [Face(0.6, i / 10, 0.5, i / 10 + 0.05, 0.6) for i in range(7)]  # 7 people
    two = small[:2]
    faces = [Face(0.8, i / 10, 0.1, i / 10 + 0.05, 0.17) for i in range(3)]
    assert {t["tag_name"] for t in rules.tags_for([], big)} == {"person", "portrait"}
    assert {t["tag_name"] for t in rules.tags_for([], small)} == {"person", "group photo", "crowd"}
    assert {t["tag_name"] for t in rules.tags_for([], two)} == {"person"}
    assert {t["tag_name"] for t in rules.tags_for(faces, [])} == {"person", "group photo"}
    assert rules.tags_for([], []) == []
