"""The real tagger: EfficientNet-Lite0 + the label rules, and BlazeFace + the people rules.

The classifier gives ImageNet probabilities; the rules turn them into labels people search
for (猫, 咖啡) and broad categories (动物, 食物). ImageNet has no person class, so a face
detector adds 人物 / 合影 / 人像 (``people.py``, thresholds in ``data/people.toml``).

``prepare`` (the classifier's resize, crop and normalise, and the detector's letterboxed
views of the same decoded image) runs per request in the server's decode threads;
``tag_batch`` only stacks the prepared inputs and runs each model once for the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from batchtag.taggers.base import Tag
from batchtag.taggers.faces import FaceDetector, Views, prepare_views
from batchtag.taggers.imagenet import RESIZE_SIZE, ImageNetClassifier, to_rgb
from batchtag.taggers.people import PeopleRules
from batchtag.taggers.rules import LabelRules


@dataclass(frozen=True)
class Prepared:
    """One image made ready for both models; ``faces`` is None when the people stage is off."""

    pixels: np.ndarray  # (3, 224, 224) uint8: the classifier's crop, normalised a batch at a time
    faces: Views | None


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
    ) -> None:
        self.classifier = classifier or ImageNetClassifier()
        self.rules = LabelRules.load(lang)
        self.people = PeopleRules.load(lang) if faces else None
        self.detector = None
        if self.people is not None:
            self.detector = detector or FaceDetector(settings=self.people.detector)

    def prepare(self, image: Image.Image) -> Prepared:
        """The network inputs for one image (thread-safe)."""
        image = to_rgb(image)
        views = prepare_views(image, self.people.detector) if self.people is not None else None
        return Prepared(self.classifier.crop_pixels(image), views)

    def tag_batch(self, items: list[Any]) -> list[list[Tag]]:
        """Tags for prepared inputs (from ``prepare``); plain images are prepared here."""
        if not items:
            return []
        prepared = [item if isinstance(item, Prepared) else self.prepare(item) for item in items]
        probs = self.classifier.predict(self.classifier.normalize(np.stack([p.pixels for p in prepared])))
        tags: list[list[Tag]] = self.rules.tags_batch(probs)  # type: ignore[assignment]
        if self.people is None or self.detector is None:
            return tags
        faces = self.detector.detect([p.faces for p in prepared if p.faces is not None])
        return [
            self.people.merge(found, classifier_tags, self.rules.max_tags)
            for found, classifier_tags in zip(faces, tags, strict=True)
        ]
