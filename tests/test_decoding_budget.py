"""One decoding budget: decompression bombs of every format through `run`, `serve` and
`report` get code 20 (or no thumbnail) and cost no more memory than their headers.

Memory is compared, not timed: the peak RSS (VmHWM) of the same command over the same
normal images with and without one bomb of each format beside them. Decoding any one bomb
would take 144 megapixels (430 MB as RGB); the bound allowed for all of them together is
``BOMB_BOUND_BYTES``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from batchtag import codes
from batchtag.records import Record
from tests.bombs import BOMBS, gif_bomb
from tests.export_helpers import EXAMPLES, out_records
from tests.support import batchtag_command, credentials_env, http_get, run_cli, write_credentials

BOMB_BOUND_BYTES = 64 * 1024 * 1024
NORMAL_FORMATS = {"png": "PNG", "bmp": "BMP", "webp": "WEBP", "tif": "TIFF", "heic": "HEIF"}


def normal_images(folder: Path) -> list[Path]:
    """The example photos and one ordinary image of each other format batchtag tags."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("*.md"))
    noise = Image.effect_noise((800, 600), 40).convert("RGB")
    for extension, fmt in NORMAL_FORMATS.items():
        noise.save(folder / f"normal.{extension}", fmt)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def bomb_files(folder: Path) -> dict[Path, bytes]:
    folder.mkdir()
    made = {folder / f"bomb.{name}": make() for name, make in BOMBS.items()}
    for path, data in made.items():
        path.write_bytes(data)
    return made


def peak_rss(tmp_path: Path, *args) -> tuple[int, object]:
    """Run `batchtag ARGS` under bench.peak: (its peak RSS in bytes, the finished process)."""
    peak_file = tmp_path / f"peak-{len(list(tmp_path.glob('peak-*')))}"
    done = subprocess.run(
        batchtag_command(*args, module="bench.peak"),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BENCH_PEAK_FILE": str(peak_file), "BATCHTAG_ENDPOINT": ""},
    )
    return int(peak_file.read_text()) * 1024, done


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path, list[Path], dict[Path, bytes]]:
    """normal/: ordinary images; mixed/: the same plus one bomb of each format."""
    root = tmp_path_factory.mktemp("budget")
    normal = normal_images(root / "normal")
    shutil.copytree(root / "normal", root / "mixed")
    bombs = bomb_files(root / "mixed" / "bombs")
    return root / "normal", root / "mixed", normal, bombs


def test_run_gives_every_bomb_code_20_tags_the_rest_and_bombs_cost_no_memory(trees, tmp_path):
    normal, mixed, images, bombs = trees
    base_peak, base = peak_rss(
        tmp_path, "run", normal, "-o", tmp_path / "normal.jsonl", "--tagger", "color", "--no-progress"
    )
    assert base.returncode == 0, base.stderr
    peak, done = peak_rss(
        tmp_path, "run", mixed, "-o", tmp_path / "mixed.jsonl", "--tagger", "color", "--no-progress"
    )
    assert done.returncode == 1, done.stderr

    assert "Warning" not in done.stderr  # no DecompressionBombWarning noise: the budget's error says it
    records = {Path(r.key): r for r in out_records(tmp_path / "mixed.jsonl")}
    assert {path for path in records if path.parent.name == "bombs"} == set(bombs)
    for path in bombs:
        assert records[path].code == codes.IMAGE_TOO_LARGE, (path.name, records[path].message)
        assert "pixel" in records[path].message
    others = [r for path, r in records.items() if path not in bombs]
    assert len(others) == len(images) and all(r.ok and r.tags for r in others)
    print(json.dumps({"run_peak_mb": [base_peak >> 20, peak >> 20]}))
    assert peak <= base_peak + BOMB_BOUND_BYTES


def test_serve_refuses_the_bombs_the_client_sends_as_they_are_and_its_memory_stays_flat(
    trees, tmp_path, spawner
):
    normal, mixed, images, bombs = trees
    server, url = spawner.serve(write_credentials(tmp_path / "creds.json"))
    client = {**credentials_env(), "BATCHTAG_ENDPOINT": url}

    def served(source: Path, out: Path) -> list[Record]:
        done = run_cli("run", source, "-o", out, "--no-progress", "--retries", "0", env=client)
        assert done.returncode in (0, 1), done.stderr
        return out_records(out)

    assert all(r.ok for r in served(normal, tmp_path / "warm.jsonl"))  # the server's normal peak
    before = vm_hwm(server.popen.pid)
    records = {Path(r.key): r for r in served(mixed, tmp_path / "mixed.jsonl")}
    after = vm_hwm(server.popen.pid)

    assert all(records[path].code == codes.IMAGE_TOO_LARGE for path in bombs)
    assert sum(1 for path, r in records.items() if path not in bombs and r.ok) == len(images)
    answered = json.loads(http_get(url + "/stats", timeout=10)[1])["responses"]
    sent_as_is = [p for p in bombs if p.suffix in (".png", ".jpg", ".bmp") and ".exif" not in p.name]
    assert answered.get(str(codes.IMAGE_TOO_LARGE)) == len(sent_as_is)  # the server judged these
    print(json.dumps({"serve_peak_mb": [before >> 20, after >> 20]}))
    assert after <= before + BOMB_BOUND_BYTES


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_report_makes_no_thumbnail_of_a_bomb_never_opens_a_fifo_and_bombs_cost_no_memory(trees, tmp_path):
    _, _, images, bombs = trees
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "bomb.gif").write_bytes(gif_bomb())  # run does not take GIF; a crafted OUT can name one
    os.mkfifo(extra / "pipe.jpg")  # would block open() forever

    def out_of(paths: list[Path], out: Path) -> Path:
        out.write_bytes(b"".join(Record(str(p), "file", "ok", 0, "success", [], 1).to_line() for p in paths))
        return out

    base_peak, base = peak_rss(
        tmp_path, "report", out_of(images, tmp_path / "n.jsonl"), "-o", tmp_path / "n.html", "--no-progress"
    )
    assert base.returncode == 0 and f"{len(images)} thumbnails made" in base.stderr, base.stderr
    hostile = [*images, *bombs, extra / "bomb.gif", extra / "pipe.jpg"]
    peak, done = peak_rss(
        tmp_path, "report", out_of(hostile, tmp_path / "m.jsonl"), "-o", tmp_path / "m.html", "--no-progress"
    )
    assert done.returncode == 0, done.stderr
    # A JPEG is counted at the scale it is decoded at: the 12000x12000 one with EXIF is 1500x1500 at 1/8.
    cheap_jpeg = [p for p in bombs if p.name == "bomb.exif.jpg"]
    assert f"{len(images) + len(cheap_jpeg)} thumbnails made" in done.stderr, done.stderr
    print(json.dumps({"report_peak_mb": [base_peak >> 20, peak >> 20]}))
    assert peak <= base_peak + BOMB_BOUND_BYTES


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets our filter
@pytest.mark.parametrize("name", sorted(BOMBS))
def test_each_client_decoder_refuses_the_bomb_with_code_20_before_decoding(name):
    from batchtag.decoding import OverBudget, open_within_budget
    from batchtag.errors import InputError
    from batchtag.pipeline.formats import register_heif, sendable
    from batchtag.pipeline.raw import largest_jpeg_preview

    register_heif()
    data = BOMBS[name]()
    with pytest.raises(OverBudget):
        open_within_budget(io.BytesIO(largest_jpeg_preview(data) if name == "dng" else data))
    try:
        sent, _ = sendable(data, f"x.{name}")
    except InputError as exc:
        assert exc.code == codes.IMAGE_TOO_LARGE
    else:
        assert sent == data  # sent as it is, undecoded: the server's decode refuses it (run test)
