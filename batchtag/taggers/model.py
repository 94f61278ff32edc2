"""The real tagger: EfficientNet-Lite0 (ONNX Runtime) + the label rules.

The classifier gives ImageNet probabilities; the rules turn them into labels people search
for (猫, 咖啡) and broad categories (动物, 食物).
"""

from __future__ import annotations

from PIL import Image

from batchtag.taggers import Tag
from batchtag.taggers.imagenet import RESIZE_SIZE, ImageNetClassifier
from batchtag.taggers.rules import LabelRules


class ModelTagger:
    name = "model"
    # Draft-decode JPEGs no smaller than the preprocessing's resize target.
    input_size = RESIZE_SIZE
    max_batch = 16

    def __init__(self, lang: str = "zh", classifier: ImageNetClassifier | None = None) -> None:
        self.classifier = classifier or ImageNetClassifier()
        self.rules = LabelRules.load(lang)

    def tag_batch(self, images: list[Image.Image]) -> list[list[Tag]]:
        if not images:
            return []
        return self.rules.tags_batch(self.classifier.classify(images))  # type: ignore[return-value]
