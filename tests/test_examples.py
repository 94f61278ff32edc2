"""What `make run` does: the embedded model tags the example photos, and the tags are right."""

from pathlib import Path

import pytest

from batchtag import RunConfig, run_batch
from batchtag.records import load_records

PHOTOS = Path(__file__).parent.parent / "examples" / "photos"

EXPECTED = {  # photo -> tags that must be among its top tags, per language
    "cat_chelsea.jpg": {"zh": {"猫", "动物"}, "en": {"cat", "animal"}},
    "large/cat_chelsea_3200px.jpg": {"zh": {"猫", "动物"}, "en": {"cat", "animal"}},
    "coffee.jpg": {"zh": {"咖啡", "饮品"}, "en": {"coffee", "drink"}},
    "rocket_falcon9.jpg": {"zh": {"火箭"}, "en": {"rocket"}},
    "grace_hopper.jpg": {"zh": {"人物", "人像"}, "en": {"person", "portrait"}},
    "astronaut_eileen_collins.jpg": {"zh": {"人物"}, "en": {"person"}},
    "cameraman_gray.jpg": {"zh": {"人物"}, "en": {"person"}},
}
# Photos without people: none of the people tags (face detector or classifier) may appear.
NO_PEOPLE = ("cat_chelsea.jpg", "large/cat_chelsea_3200px.jpg", "coffee.jpg", "rocket_falcon9.jpg")
PEOPLE_TAGS = {"zh": {"人物", "合影", "人像"}, "en": {"person", "group photo", "portrait"}}


@pytest.mark.parametrize("lang", ["zh", "en"])
async def test_embedded_model_tags_the_example_photos_correctly(tmp_path, lang):
    out = tmp_path / "tags.jsonl"
    summary = await run_batch(RunConfig(sources=[str(PHOTOS)], out=str(out), lang=lang, progress=False))
    assert summary.errors == 0 and summary.ok == len(list(PHOTOS.rglob("*.jpg")))
    tags = {
        Path(r["key"]).relative_to(PHOTOS).as_posix(): {t["tag_name"] for t in r["tags"]}
        for r in load_records(out)
    }
    for photo, wanted in EXPECTED.items():
        assert wanted[lang] <= tags[photo], (photo, tags[photo])
    for photo in NO_PEOPLE:
        assert tags[photo] and not tags[photo] & PEOPLE_TAGS[lang], (photo, tags[photo])
