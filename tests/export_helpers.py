"""Shared by the export and report tests: a real run over the example photos, tools, CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from batchtag.records import Record
from tests.support import run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "photos"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require_tool(name: str) -> str:
    """The tool's path. `make test` installs it as root; only a non-root machine without
    it may skip (a root machine without it is a broken set-up, so the test fails)."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if path:
        return path
    if os.geteuid() == 0:
        pytest.fail(f"{name} is missing: make test installs it (apt-get) when run as root")
    pytest.skip(f"{name} is not installed and we are not root to install it")


def out_records(path: Path) -> list[Record]:
    return [Record.from_dict(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]


class TaggedPhotos:
    """A copy of examples/photos plus a broken file, tagged by a real `batchtag run`, and a
    manifest with a URL the embedded server refuses (so OUT has ok, error and URL records)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.photos = root / "photos"
        self.out = root / "out.jsonl"

    def make(self) -> TaggedPhotos:
        shutil.copytree(EXAMPLES, self.photos, ignore=shutil.ignore_patterns("*.md"))
        (self.photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        manifest = self.root / "urls.txt"
        manifest.write_text("http://127.0.0.1:9/nowhere/photo.jpg\n", encoding="utf-8")
        done = run_cli("run", self.photos, manifest, "-o", self.out, "--no-progress", "--retries", "0")
        assert done.returncode == 1, done.stderr  # the broken file and the URL fail
        return self

    def records(self) -> list[Record]:
        return out_records(self.out)

    def copy_to(self, root: Path) -> TaggedPhotos:
        """The photos and OUT in a fresh folder (keys rewritten), for tests that write sidecars."""
        copy = TaggedPhotos(root)
        shutil.copytree(self.photos, copy.photos)
        lines = []
        for record in self.records():
            if record.source == "file":
                record.key = str(copy.photos / Path(record.key).relative_to(self.photos))
            lines.append(record.to_line())
        copy.out.write_bytes(b"".join(lines))
        return copy


@pytest.fixture(scope="session")
def tagged_photos(tmp_path_factory: pytest.TempPathFactory) -> TaggedPhotos:
    return TaggedPhotos(tmp_path_factory.mktemp("tagged")).make()


def generated_out(path: Path, count: int, tag_names: list[str], every_error: int = 50) -> None:
    """``count`` synthetic records (files that do not exist), written in one go."""
    with open(path, "wb") as handle:
        batch = []
        for i in range(count):
            if i % every_error == 7:
                record = Record(
                    f"/archive/{i // 1000:04d}/img_{i:07d}.jpg",
                    "file",
                    "error",
                    -9010,
                    "input error",
                    attempts=0,
                )
            else:
                tags = [
                    {"tag_name": tag_names[(i + j) % len(tag_names)], "tag_confidence": 50 + (i * 7 + j) % 50}
                    for j in range(1 + i % 3)
                ]
                record = Record(
                    f"/archive/{i // 1000:04d}/img_{i:07d}.jpg",
                    "file",
                    "ok",
                    0,
                    "success",
                    tags,
                    1,
                    extra={"elapsed_ms": i % 300},
                )
            batch.append(record.to_line())
            if len(batch) == 10_000:
                handle.write(b"".join(batch))
                batch.clear()
        handle.write(b"".join(batch))
