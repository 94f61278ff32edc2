"""The people stage of the model tagger: BlazeFace export parity, decoding, NMS, people rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from batchtag.taggers import faces as F
from batchtag.taggers import load_tagger
from batchtag.taggers.model import ModelTagger, Prepared
from batchtag.taggers.people import PeopleRules, PeopleTag

PHOTOS = Path(__file__).parent.parent / "examples" / "photos"
FIXTURE = Path(__file__).parent / "data" / "blazeface_parity.npz"
WITH_PEOPLE = ("astronaut_eileen_collins.jpg", "grace_hopper.jpg", "cameraman_gray.jpg")
WITHOUT_PEOPLE = ("cat_chelsea.jpg", "large/cat_chelsea_3200px.jpg", "coffee.jpg", "rocket_falcon9.jpg")
PEOPLE_TAGS = {"zh": {"人物", "合影", "人像"}, "en": {"person", "group photo", "portrait"}}


@pytest.fixture(scope="module")
def detector() -> F.FaceDetector:
    return F.FaceDetector()


@pytest.fixture(scope="module", params=["zh", "en"])
def tagger(request: pytest.FixtureRequest) -> ModelTagger:
    # The BlazeFace stage as it was the default before issue 18 (test_taggers_stages.py has the rest).
    stages = {"classifier", "blazeface"}
    return ModelTagger(request.param, detector=F.FaceDetector(), stages=stages, int8=False, min_confidence=0)


def photo(name: str) -> Image.Image:
    with Image.open(PHOTOS / name) as img:
        return img.convert("RGB")


def names(tags: list) -> set[str]:
    return {t["tag_name"] for t in tags}


# --------------------------------------------------------------------------- the exported model


def test_onnx_matches_tflite_outputs_on_fixed_inputs(detector: F.FaceDetector) -> None:
    """The committed ONNX file against the TFLite model's outputs, stored by the export script."""
    data = np.load(FIXTURE)
    regressors, logits = detector.raw(F.normalise(data["images"]))  # one call: the batch axis is dynamic
    assert regressors.shape == data["regressors"].shape == (len(data["images"]), 896, 16)
    np.testing.assert_allclose(regressors, data["regressors"], atol=2e-3)
    np.testing.assert_allclose(logits, data["classificators"], atol=2e-3)


def test_preprocessing_matches_the_fixture_inputs() -> None:
    """The letterboxed photos in the fixture are what ``prepare_views`` makes today."""
    data = np.load(FIXTURE)
    for name, stored in zip(data["names"], data["images"], strict=True):
        if name == "random":
            continue
        (view,) = F.whole_view(photo(str(name)))
        assert np.abs(view.astype(int) - stored.astype(int)).max() <= 2, name


# --------------------------------------------------------------------------- anchors and decoding


def test_anchors_follow_the_short_range_layout() -> None:
    anchors = F.ssd_anchors()
    assert anchors.shape == (896, 2)
    # stride 8: 16x16 cells, 2 anchors each, row by row
    np.testing.assert_allclose(anchors[0], anchors[1])
    np.testing.assert_allclose(anchors[0], [0.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(anchors[2], [1.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(anchors[32], [0.5 / 16, 1.5 / 16])
    # the three stride-16 layers share 8x8 cells with 6 anchors each
    np.testing.assert_allclose(anchors[512:518], [[0.5 / 8, 0.5 / 8]] * 6)
    np.testing.assert_allclose(anchors[-1], [7.5 / 8, 7.5 / 8])


def test_decode_offsets_are_relative_to_the_anchor() -> None:
    regressors = np.zeros((896, 16), dtype=np.float32)
    logits = np.full(896, -10.0, dtype=np.float32)
    regressors[600, :4] = [12.8, -6.4, 32.0, 16.0]  # +0.1 x, -0.05 y, 0.25 wide, 0.125 high
    logits[600] = 2.0
    boxes, scores = F.decode_boxes(regressors, logits, min_score=0.5)
    cx, cy = F.ANCHORS[600] + [0.1, -0.05]
    np.testing.assert_allclose(boxes, [[cx - 0.125, cy - 0.0625, cx + 0.125, cy + 0.0625]])
    np.testing.assert_allclose(scores, [1 / (1 + np.exp(-2.0))])


def test_letterbox_maps_back_to_the_photo() -> None:
    """A bright square in a wide photo is found where it is, through the letterbox transform."""
    image = Image.new("RGB", (300, 100))
    image.paste((255, 255, 255), (150, 40, 180, 70))
    views = F.prepare_views(image)
    (img,), (transform,) = views.images, views.transforms
    ys, xs = np.nonzero(img[0] > 128)
    box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]) / F.INPUT_SIZE
    np.testing.assert_allclose(F.to_photo(box, transform), [[0.5, 0.4, 0.6, 0.7]], atol=0.02)


def test_weighted_nms_averages_overlaps_and_keeps_separate_faces() -> None:
    boxes = np.array(
        [[0.1, 0.1, 0.3, 0.3], [0.12, 0.1, 0.32, 0.3], [0.6, 0.6, 0.8, 0.8], [0.62, 0.62, 0.7, 0.7]]
    )
    scores = np.array([0.9, 0.6, 0.8, 0.7])
    faces = F.weighted_nms(boxes, scores, iou=0.3, max_contained=0.6)
    assert [f.score for f in faces] == [0.9, 0.8]  # the box inside the 0.8 face is part of it
    np.testing.assert_allclose([faces[0].x0, faces[0].x1], [0.108, 0.308])  # (0.9*0.1+0.6*0.12)/1.5
    np.testing.assert_allclose([faces[1].x0, faces[1].y1], [0.6, 0.8])
    assert faces[0].area == pytest.approx(0.04)


# --------------------------------------------------------------------------- the tagger on photos


@pytest.mark.parametrize("name", WITH_PEOPLE)
def test_photos_with_people_get_the_person_tag(tagger: ModelTagger, name: str) -> None:
    (tags,) = tagger.tag_batch([photo(name)])
    assert {"zh": "人物", "en": "person"}[tagger.rules.lang] in names(tags), tags


def test_photos_without_people_get_no_people_tags(tagger: ModelTagger) -> None:
    results = tagger.tag_batch([photo(name) for name in WITHOUT_PEOPLE])
    for name, tags in zip(WITHOUT_PEOPLE, results, strict=True):
        assert not names(tags) & PEOPLE_TAGS[tagger.rules.lang], (name, tags)
        assert tags, name  # the classifier's tags are still there


def test_person_confidence_is_the_detector_score(tagger: ModelTagger, detector: F.FaceDetector) -> None:
    image = photo("astronaut_eileen_collins.jpg")
    (face, *_) = detector.detect([F.prepare_views(image)])[0]
    (tags,) = tagger.tag_batch([image])
    person = {"zh": "人物", "en": "person"}[tagger.rules.lang]
    assert tags[0] == {"tag_name": person, "tag_confidence": round(100 * face.score)}
    assert face.score > 0.85


def test_portrait_only_when_one_face_fills_the_frame(tagger: ModelTagger) -> None:
    portrait = {"zh": "人像", "en": "portrait"}[tagger.rules.lang]
    hopper, astronaut = tagger.tag_batch([photo("grace_hopper.jpg"), photo("astronaut_eileen_collins.jpg")])
    assert portrait in names(hopper)
    assert portrait not in names(astronaut)  # a half figure in a scene: its face is 3 % of the photo


def head(image: Image.Image, detector: F.FaceDetector) -> Image.Image:
    """A square crop around the photo's strongest face, 1.8 times its size."""
    face = detector.detect([F.prepare_views(image)])[0][0]
    w, h = image.size
    cx, cy = (face.x0 + face.x1) / 2 * w, (face.y0 + face.y1) / 2 * h
    side = max((face.x1 - face.x0) * w, (face.y1 - face.y0) * h) * 1.8
    box = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
    return image.crop(box).resize((320, 320), Image.Resampling.LANCZOS)


def test_three_faces_make_a_group_photo(tagger: ModelTagger, detector: F.FaceDetector) -> None:
    """A collage of three heads from the example photos (the mirrored one counts as a third)."""
    astronaut = head(photo("astronaut_eileen_collins.jpg"), detector)
    hopper = head(photo("grace_hopper.jpg"), detector)
    collage = Image.new("RGB", (960, 320))
    for i, part in enumerate((astronaut, hopper, ImageOps.mirror(astronaut))):
        collage.paste(part, (320 * i, 0))
    pair = collage.crop((0, 0, 640, 320))
    three, two = tagger.tag_batch([collage, pair])
    group, portrait = {"zh": ("合影", "人像"), "en": ("group photo", "portrait")}[tagger.rules.lang]
    assert len(detector.detect([F.prepare_views(collage)])[0]) == 3
    assert group in names(three) and portrait not in names(three), three
    assert group not in names(two), two


def test_prepared_inputs_carry_both_models_inputs(tagger: ModelTagger) -> None:
    prepared = tagger.prepare(Image.open(PHOTOS / "cameraman_gray.jpg"))  # greyscale: converted once
    assert isinstance(prepared, Prepared)
    assert prepared.pixels.shape == (3, 224, 224)
    assert prepared.faces is not None and prepared.faces.images.shape == (1, 3, 128, 128)
    assert tagger.tag_batch([prepared]) == tagger.tag_batch([Image.open(PHOTOS / "cameraman_gray.jpg")])


def test_the_classifier_alone_tags_no_person() -> None:
    tagger = load_tagger("model", "en", stages={"classifier"})
    assert isinstance(tagger, ModelTagger) and tagger.detector is None and tagger.objects is None
    (tags,) = tagger.tag_batch([photo("astronaut_eileen_collins.jpg")])
    assert "person" not in names(tags)  # ImageNet has no person class: the other stages add it
    prepared = tagger.prepare(photo("coffee.jpg"))
    assert prepared.faces is None and prepared.objects is None


def test_without_faces_the_object_detector_still_finds_the_person() -> None:
    tagger = load_tagger("model", "en", faces=False)
    assert isinstance(tagger, ModelTagger) and tagger.detector is None and tagger.centerface is None
    assert tagger.objects is not None
    (tags,) = tagger.tag_batch([photo("astronaut_eileen_collins.jpg")])
    assert "person" in names(tags)
    assert tagger.prepare(photo("coffee.jpg")).faces is None


def test_serve_has_a_no_faces_switch() -> None:
    from batchtag.cli import make_parser

    assert make_parser().parse_args(["serve"]).faces is True
    assert make_parser().parse_args(["serve", "--no-faces"]).faces is False


# --------------------------------------------------------------------------- the rules data


def test_people_tag_counts_faces_by_score_and_size() -> None:
    big, small, weak = F.Face(0.9, 0, 0, 0.5, 0.5), F.Face(0.8, 0.6, 0.6, 0.7, 0.7), F.Face(0.4, 0, 0, 1, 1)
    group = PeopleTag("group", "group photo", "合影", min_score=0.65, min_faces=2)
    portrait = PeopleTag("portrait", "portrait", "人像", min_score=0.65, max_faces=1, min_face_area=0.2)
    assert group.confidence([big, small, weak]) == 0.8  # the weakest face it needed
    assert group.confidence([big, weak]) is None
    assert portrait.confidence([big, small]) == 0.9  # the small face does not count against it
    assert portrait.confidence([big, F.Face(0.7, 0.5, 0.5, 1, 1)]) is None


def test_packaged_rules_load_in_both_languages() -> None:
    zh, en = PeopleRules.load("zh"), PeopleRules.load("en")
    assert {t.label("zh") for t in zh.tags} == {"人物", "合影", "人像", "人群"}
    assert {t.label("en") for t in en.tags} == {"person", "group photo", "portrait", "crowd"}
    assert {t.source for t in zh.tags} == {"faces", "persons"}
    assert zh.detector.tiles == 1 and 0.5 < zh.tags[0].min_score < 0.79  # between cat and cameraman


def test_merge_keeps_one_tag_per_name_with_the_higher_confidence() -> None:
    rules = PeopleRules.load("en")
    face = F.Face(0.7, 0.4, 0.4, 0.6, 0.6)
    theirs = [{"tag_name": "clothing", "tag_confidence": 81}, {"tag_name": "person", "tag_confidence": 90}]
    merged = rules.merge([face], theirs, max_tags=10)  # type: ignore[arg-type]
    assert merged == [
        {"tag_name": "person", "tag_confidence": 90},
        {"tag_name": "clothing", "tag_confidence": 81},
    ]
    assert rules.merge([], theirs, max_tags=10) == theirs  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[tag]]\nid='p'\nlabel_en='p'\nlabel_zh='人'\nmin_score=1.5\n", "must be in"),
        ("[[tag]]\nid='p'\nlabel_en='p'\nlabel_zh='人'\nmin_score=0\n", "every photo"),
        ("[[tag]]\nid='p'\nlabel_en='p'\nlabel_zh=''\nmin_score=0.7\n", "label_zh"),
        ("[[tag]]\nid='p'\nlabel_en='p'\nlabel_zh='人'\nmin_score=0.7\nmin_faces=3\nmax_faces=2\n", "below"),
        ("[[tag]]\nid='p'\nlabel_en='p'\nlabel_zh='人'\nmin_score=0.7\ncolour='x'\n", "unknown key"),
        ("[detector]\ntiles=0\n[[tag]]\nid='p'\nlabel_en='p'\nlabel_zh='人'\nmin_score=0.7\n", "tiles"),
        ("[detector]\nmin_score=0.5\n", "no [[tag]]"),
        ("[[tag]\n", "people.toml"),
    ],
)
def test_broken_rules_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "people.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        PeopleRules.load("en", path)


def test_detector_refuses_a_missing_model_and_zero_threads(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="export_face_model"):
        F.FaceDetector(tmp_path / "absent.onnx")
    with pytest.raises(ValueError, match="threads"):
        F.FaceDetector(threads=0)
