"""The real tagger: EfficientNet-Lite0 (ONNX Runtime) + the label rules.

The classifier gives ImageNet probabilities; the rules turn them into labels people search
for (猫, 咖啡) and broad categories (动物, 食物).

``prepare`` (resize, centre crop, normalise) runs per request in the server's decode
threads; ``tag_batch`` only stacks the prepared inputs and runs the model once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
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

    def prepare(self, image: Image.Image) -> np.ndarray:
        """The (3, 224, 224) float32 network input for one image (thread-safe)."""
        return self.classifier.preprocess(image)

    def tag_batch(self, items: list[Any]) -> list[list[Tag]]:
        """Tags for prepared inputs (from ``prepare``); plain images are prepared here."""
        if not items:
            return []
        inputs = [item if isinstance(item, np.ndarray) else self.prepare(item) for item in items]
        probs = self.classifier.predict(np.stack(inputs))
        return self.rules.tags_batch(probs)  # type: ignore[return-value]
