"""The baseline a careful user would write without batchtag: one process, no HTTP.

    python -m bench.direct_loop MANIFEST      # prints {"images": N, "wall_s": S} as JSON

For each file: Pillow draft decode to a short side >= 256, bicubic resize of the short side
to 256, centre crop 224, normalise; every 16 images, one call of the same ONNX model
(``ImageNetClassifier.predict``). Written out here on purpose, not with batchtag's own
preprocessing, so that speeding batchtag up cannot speed its baseline up too.

Run as a subprocess and timed from spawn to exit like ``batchtag run``, so both pay for
interpreter start, imports and loading the model.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

BATCH = 16
SHORT_SIDE = 256
CROP = 224


def load(path: str) -> np.ndarray:
    with Image.open(path) as image:
        image.draft("RGB", (SHORT_SIDE, SHORT_SIDE))
        image = image.convert("RGB")
    w, h = image.size
    scale = SHORT_SIDE / min(w, h)
    size = (max(SHORT_SIDE, int(w * scale)), max(SHORT_SIDE, int(h * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - CROP) // 2, (size[1] - CROP) // 2
    pixels = np.asarray(image.crop((left, top, left + CROP, top + CROP)), dtype=np.float32)
    return ((pixels - 127.0) / 128.0).transpose(2, 0, 1)


def main(manifest: str) -> None:
    from batchtag.taggers.imagenet import ImageNetClassifier

    started = time.monotonic()
    classifier = ImageNetClassifier()
    paths = Path(manifest).read_text(encoding="utf-8").split()
    for start in range(0, len(paths), BATCH):
        batch = np.stack([load(p) for p in paths[start : start + BATCH]])
        classifier.predict(batch)
    print(json.dumps({"images": len(paths), "loop_s": time.monotonic() - started}))


if __name__ == "__main__":
    main(sys.argv[1])
