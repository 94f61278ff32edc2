"""The real tagger: up to three stages on one decoded image, merged into one tag list.

Stages (``batchtag.taggers.STAGES``; which ones run is the tagger's ``stages``):

- ``classifier``: EfficientNet-Lite0's ImageNet probabilities (INT8 by default,
  ``scripts/quantize_classifier.py``) through the label rules (``rules.py``,
  ``data/imagenet_rules.csv``): breeds, foods, scenes (seashore, alp) and objects, and broad
  categories (动物, 食物);
- ``detector``: YOLOX-nano's 80 COCO classes (``objects.py``, ``data/coco_rules.csv``:
  bilingual names and the same categories), and its person boxes for the people rules;
- ``faces`` (not a default): CenterFace (``centerface.py``) counting small faces for the
  people rules, on the detector's own input; with the detector on, only for photos with 3+
  people in it;
- ``blazeface``: the face stage before issue 18 (``faces.py``), kept for comparison.

ImageNet has no person class, so people come from ``people.py`` (``data/people.toml``):
人物 / 人像 from faces or person boxes, 合影 for a posed group, 人群 for many small people.

Merging: a name given by several stages (狗 from the detector and the classifier, 人物 from a
face and a person box) appears once with the highest confidence; specific names come first,
most confident first, then broad categories; then everything below ``min_confidence`` goes and
at most ``max_tags`` stay. Confidences are each stage's own probability-like score x 100 (the
classifier's summed softmax, the detector's objectness x class score, the face score).

``prepare`` (each stage's resize of the same decoded image, and the INT8 classifier itself)
runs per request in the server's decode threads; ``tag_batch`` stacks the prepared inputs and
runs each other model once for the batch (see ``prepare`` for why).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from batchtag.taggers.base import DEFAULT_MIN_CONFIDENCE, DEFAULT_STAGES, Tag, above, check_stages, confidence
from batchtag.taggers.centerface import CenterFace
from batchtag.taggers.faces import Face, FaceDetector, Views, prepare_views
from batchtag.taggers.imagenet import RESIZE_SIZE, ImageNetClassifier, to_rgb
from batchtag.taggers.objects import CocoRule, Detections, ObjectDetector, read_coco_rules
from batchtag.taggers.people import PeopleRules
from batchtag.taggers.rules import DEFAULT_MAX_TAGS, LabelRules, _data_file, read_categories

Named = list[tuple[str, int]]  # (tag name, confidence 0..100)
INT8_CLASSIFIER = Path(__file__).resolve().parent / "data" / "efficientnet_lite0_int8.onnx"
# A person box counts towards CenterFace's gate from this score (the people rules' own floor).
PERSON_FLOOR = 0.4


@dataclass(frozen=True)
class Prepared:
    """One image made ready for every stage; a stage that is off has None."""

    pixels: np.ndarray  # (3, 224, 224) uint8: the classifier's crop (the float one's batch input)
    faces: Views | None  # BlazeFace's views (the blazeface stage)
    objects: tuple[np.ndarray, float] | None  # the detector's and CenterFace's letterboxed input, its scale
    size: tuple[int, int]  # the decoded photo's (width, height)
    probs: np.ndarray | None = None  # (1000,) the INT8 classifier's probabilities, run in prepare


class ObjectRules:
    """COCO class scores to (specific, broad) names in one language (``data/coco_rules.csv``)."""

    def __init__(self, lang: str) -> None:
        categories = read_categories(_data_file("categories.csv"))
        self.rules: list[CocoRule] = read_coco_rules(set(categories))
        self.names = [r.label(lang) for r in self.rules]
        self.thresholds = np.array([r.threshold for r in self.rules])
        self.category_names = {cid: c.label(lang) for cid, c in categories.items()}

    def parts(self, class_scores: np.ndarray) -> tuple[Named, Named]:
        """Classes at or above their threshold, and their categories at the best member's score."""
        hits = np.flatnonzero(class_scores >= self.thresholds)
        hits = hits[np.argsort(-class_scores[hits], kind="stable")]
        specific = [(self.names[i], confidence(float(class_scores[i]))) for i in hits]
        broad: dict[str, int] = {}
        for i in hits:
            for cid in self.rules[i].categories:
                name = self.category_names[cid]
                broad.setdefault(name, confidence(float(class_scores[i])))
        return specific, list(broad.items())


class ModelTagger:
    name = "model"
    # The decode floor: 5/4 of the preprocessing's resize target. A 4000x3000 JPEG then
    # decodes at 1/8 scale (500x375; a floor of 512 gave 1000x750, four times the pixels),
    # while every example photo decodes exactly as with that 512 floor. A floor of 256 itself
    # let a 512x600 photo decode at 1/2 straight to the model's size, and its near-tied
    # top-1 class flipped (tests/test_model_decode.py).
    input_size = RESIZE_SIZE * 5 // 4
    max_batch = 16

    def __init__(
        self,
        lang: str = "zh",
        classifier: ImageNetClassifier | None = None,
        faces: bool = True,
        detector: FaceDetector | None = None,
        stages: Iterable[str] | None = None,
        min_confidence: int = DEFAULT_MIN_CONFIDENCE,
        objects: ObjectDetector | None = None,
        max_tags: int = DEFAULT_MAX_TAGS,
        int8: bool = True,
    ) -> None:
        """``stages``: see ``batchtag.taggers`` (default ``DEFAULT_STAGES``); ``faces=False``
        drops the face stages; ``int8=False`` runs the float classifier (for comparisons)."""
        chosen = check_stages(DEFAULT_STAGES if stages is None else stages)
        if not faces:
            chosen -= {"faces", "blazeface"}
        self.stages = chosen
        self.min_confidence = min_confidence
        self.max_tags = max_tags
        # The INT8 classifier on one intra-op thread: its many small operators cost more CPU
        # split over two (the same logits either way), and on two busy cores the CPU an image
        # is what sets the images a second (bench section ``stages``).
        self.classifier = classifier or (
            ImageNetClassifier(model_path=INT8_CLASSIFIER, threads=1) if int8 else ImageNetClassifier()
        )
        # The INT8 classifier runs in prepare (see there); the float one, standing for the
        # default before issue 18 in bench section ``stages``, a batch at a time in tag_batch
        # as it did then.
        self.classify_in_prepare = int8
        # The classifier's own cut is left to the merge, which sees every stage's names.
        self.rules = LabelRules.load(lang, max_tags=1000)
        people_needed = bool(chosen & {"faces", "blazeface", "detector"})
        self.people = PeopleRules.load(lang) if people_needed else None
        self.detector = None  # BlazeFace (the attribute keeps its pre-issue-18 name)
        if "blazeface" in chosen and self.people is not None:
            self.detector = detector or FaceDetector(settings=self.people.detector)
        self.centerface = None
        if "faces" in chosen and self.people is not None:
            settings = self.people.centerface
            self.centerface = CenterFace(min_score=settings.min_score, nms_iou=settings.nms_iou)
        self.objects = None
        self.object_rules = None
        if "detector" in chosen or "faces" in chosen:
            self.objects = objects or ObjectDetector()  # CenterFace takes the detector's input too
        if "detector" in chosen:
            self.object_rules = ObjectRules(lang)

    def prepare(self, image: Image.Image) -> Prepared:
        """The network inputs for one image, and the INT8 classifier's answer (thread-safe).

        The INT8 classifier runs here, one photo a call, in the server's decode threads: alone
        it costs the CPU it costs in a batch (2.2 ms at 1, 2, 4 or 8 photos a call, 2.7 at 16),
        and there it runs beside the detector's batch on the other core. With both models in
        tag_batch, that one thread was busier than the decoding (~6 ms a photo) and the run
        could not use both cores: 0.95-1.14x the images/s of the default before, at 1.13-1.16x
        its CPU an image (generated 640 px, bench section ``stages``); 1.07-1.26x after this.
        The detector stays batched: in the decode threads too it cost ~1 ms more CPU a photo.
        """
        image = to_rgb(image)
        views = (
            prepare_views(image, self.people.detector) if self.detector is not None and self.people else None
        )
        objects = self.objects.prepare(image) if self.objects is not None else None
        pixels = self.classifier.crop_pixels(image)
        probs = None
        if self.classify_in_prepare:
            (probs,) = self.classifier.predict(self.classifier.normalize(pixels[None]))
        return Prepared(pixels, views, objects, image.size, probs)

    def tag_batch(self, items: list[Any]) -> list[list[Tag]]:
        """Tags for prepared inputs (from ``prepare``); plain images are prepared here."""
        if not items:
            return []
        prepared = [item if isinstance(item, Prepared) else self.prepare(item) for item in items]
        classified = self.rules.parts_batch(self._probabilities(prepared))
        found = self._objects(prepared)
        faces = self._faces(prepared, found)
        return [
            self._merge(parts, photo_faces, objects)
            for parts, photo_faces, objects in zip(classified, faces, found, strict=True)
        ]

    def _probabilities(self, prepared: Sequence[Prepared]) -> np.ndarray:
        """(N, 1000) class probabilities: prepare's, or the float classifier's for the batch."""
        if all(p.probs is not None for p in prepared):
            return np.stack([p.probs for p in prepared if p.probs is not None])
        return self.classifier.predict(self.classifier.normalize(np.stack([p.pixels for p in prepared])))

    def _faces(self, prepared: Sequence[Prepared], found: Sequence[Detections | None]) -> list[list[Face]]:
        """Faces per photo from the face stage that is on (CenterFace where it is asked for)."""
        faces: list[list[Face]] = [[] for _ in prepared]
        if self.detector is not None:
            faces = self.detector.detect([p.faces for p in prepared if p.faces is not None])
        if self.centerface is None or self.people is None:
            return faces
        wanted = [i for i, p in enumerate(prepared) if p.objects is not None and self._wants_faces(found[i])]
        squares = [prepared[i].objects for i in wanted]
        more = self.centerface.detect(
            [s[0] for s in squares if s is not None],
            [s[1] for s in squares if s is not None],
            [prepared[i].size for i in wanted],
        )
        for i, photo_faces in zip(wanted, more, strict=True):
            faces[i] = photo_faces
        return faces

    def _wants_faces(self, objects: Detections | None) -> bool:
        """CenterFace runs where the detector saw enough people (or the detector is off)."""
        if "detector" not in self.stages or objects is None or self.people is None:
            return True
        floor = self.people.centerface
        return sum(1 for p in objects.persons if p.score >= PERSON_FLOOR) >= floor.min_persons

    def _objects(self, prepared: Sequence[Prepared]) -> list[Detections | None]:
        if self.objects is None or "detector" not in self.stages:
            return [None for _ in prepared]
        inputs = [p.objects for p in prepared if p.objects is not None]
        return list(self.objects.detect(inputs, [p.size for p in prepared]))

    def _merge(
        self, classified: tuple[Named, Named], faces: list[Face], objects: Detections | None
    ) -> list[Tag]:
        """One photo's tags from every stage (see the module docstring)."""
        specific, broad = list(classified[0]), list(classified[1])
        persons: list[Face] = []
        if objects is not None and self.object_rules is not None:
            more_specific, more_broad = self.object_rules.parts(objects.class_scores)
            specific += more_specific
            broad += more_broad
            persons = objects.persons
        if self.people is not None:
            specific = [
                (t["tag_name"], t["tag_confidence"]) for t in self.people.tags_for(faces, persons)
            ] + specific
        return above(merge_named(specific, broad), self.min_confidence)[: self.max_tags]


def merge_named(specific: Named, broad: Named) -> list[Tag]:
    """Each name once at its best confidence; specific names first, then broad, each by confidence.

    A name that is both (狗 is a label and a category) counts as specific.
    """
    best_specific: dict[str, int] = {}
    for name, conf in specific:
        best_specific[name] = max(conf, best_specific.get(name, 0))
    best_broad: dict[str, int] = {}
    for name, conf in broad:
        best_broad[name] = max(conf, best_broad.get(name, 0))
    for name in best_specific.keys() & best_broad.keys():
        best_specific[name] = max(best_specific[name], best_broad.pop(name))
    ordered = sorted(best_specific.items(), key=lambda kv: -kv[1])
    ordered += sorted(best_broad.items(), key=lambda kv: -kv[1])
    return [Tag(tag_name=name, tag_confidence=conf) for name, conf in ordered]
