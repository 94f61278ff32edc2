"""The server's fast decode (JPEG draft mode, whole-factor reduce, down to the model
tagger's floor) changes the pixels the model sees; it must not change what the model says.

Reference: the same decode with a floor of twice the resize target (512), which is how the
server decoded before the floor came down. For every example photo the top-1 class must be
the same; for a 4000x3000 version of each (where a draft decode at 1/8 scale bites hardest)
it must be the same or, where the example tests name a class family (cats), in that family.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from batchtag.server.config import ServeConfig
from batchtag.server.imaging import DecodeLimits, decode_image
from batchtag.server.service import create_state
from batchtag.taggers.imagenet import RESIZE_SIZE
from batchtag.taggers.model import ModelTagger

PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "photos"
CAMERA = (4000, 3000)
CATS = {281, 282, 283, 284, 285}  # tabby, tiger, Persian, Siamese, Egyptian: near-ties among them
FAMILY = {"cat_chelsea.jpg": CATS, "cat_chelsea_3200px.jpg": CATS}


def photos() -> list[Path]:
    return sorted(PHOTOS.rglob("*.jpg"))


@pytest.fixture(scope="module")
def tagger() -> ModelTagger:
    return ModelTagger(lang="en", faces=False)  # the classifier is what is compared


@pytest.fixture(scope="module")
def server_limits(tagger: ModelTagger) -> DecodeLimits:
    return create_state(ServeConfig(tagger="model"), tagger).limits


def camera_jpeg(photo: Path) -> bytes:
    with Image.open(photo) as image:
        big = ImageOps.fit(image.convert("RGB"), CAMERA, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def top1(tagger: ModelTagger, data: bytes, limits: DecodeLimits) -> int:
    prepared = tagger.prepare(decode_image(data, limits)).pixels
    return int(tagger.classifier.predict(tagger.classifier.normalize(prepared[np.newaxis])).argmax())


@pytest.mark.parametrize("photo", photos(), ids=lambda p: p.name)
def test_fast_decode_keeps_the_top1_class(
    tagger: ModelTagger, server_limits: DecodeLimits, photo: Path
) -> None:
    reference = DecodeLimits(server_limits.max_image_bytes, server_limits.max_pixels, 2 * RESIZE_SIZE)
    data = photo.read_bytes()
    assert top1(tagger, data, server_limits) == top1(tagger, data, reference)
    big = camera_jpeg(photo)
    fast, slow = top1(tagger, big, server_limits), top1(tagger, big, reference)
    assert fast == slow or {fast, slow} <= FAMILY.get(photo.name, set()), (fast, slow)


def test_a_camera_photo_is_decoded_at_an_eighth(server_limits: DecodeLimits) -> None:
    """The speed-up itself: 4000x3000 decodes to 500x375, not the 1000x750 a 512 floor gave."""
    assert decode_image(camera_jpeg(photos()[0]), server_limits).size == (500, 375)
