"""Section 5: the local model over HTTP vs the raw batched model, with decode broken out.

Since issue 18 the section measures the stages it was written for, the float classifier with
and without BlazeFace (``--stages classifier,blazeface`` / ``--stages classifier``, both with
``--float-classifier``; "--no-faces" in the rows means the latter); today's default is
measured in section ``stages``.
The people stage (face detector) is measured against ``serve --no-faces`` in the same run:
two servers, runs alternating between them, median of the per-repeat throughput ratios
(goal: the stage costs at most 20 %, ratio >= 0.80).

Raw: ``ImageNetClassifier.predict`` on a preprocessed batch of 16 (the server's max
batch), in this process with no server running. HTTP: ``batchtag serve --tagger model``
and ``batchtag run`` on 3000 px and 640 px JPEGs (made from examples/photos). The batch
sizes the server actually formed come from GET /stats; the server's decode step
(``batchtag.server.imaging.decode_image`` with the model's draft-mode limits) and the
model's preprocessing are timed directly on the same files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import (
    EXAMPLES,
    Ctx,
    Row,
    Section,
    Server,
    fmt,
    median,
    photo_set,
    run_client,
    serve,
    unique_copies,
    write_manifest,
)
from bench.plots import bar_plot

BATCH = 16
CONCURRENCY = 32


BLAZEFACE_STAGES = ["--stages", "classifier,blazeface", "--float-classifier"]
CLASSIFIER_ONLY = ["--stages", "classifier", "--float-classifier"]


def make_photos(ctx: Ctx, side: int, count: int) -> list[Path]:
    """``count`` paths of JPEGs whose long side is ``side``, resized from the example photos."""

    def resize(image: Image.Image) -> Image.Image:
        scale = side / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        return image.resize(size, Image.Resampling.BICUBIC)

    sources = sorted(EXAMPLES.glob("*.jpg")) + sorted((EXAMPLES / "large").glob("*.jpg"))
    return photo_set(ctx, f"photos-{side}", count, sources, resize)


def run(ctx: Ctx) -> Section:
    from batchtag.server.imaging import DecodeLimits, decode_image
    from batchtag.taggers.imagenet import ImageNetClassifier
    from batchtag.taggers.model import ModelTagger

    section = Section(
        "model", f"5. Local model (--tagger model) over HTTP vs raw batched model (batch {BATCH})"
    )
    repeats = ctx.pick(1, 5)
    # Distinct bytes in every file: batchtag tags identical bytes once, so hard-linked copies
    # would measure one request and a lot of reused records.
    sets = {
        "3000 px": unique_copies(ctx, "model-3000-unique", make_photos(ctx, 3000, ctx.pick(16, 64))),
        "640 px": unique_copies(ctx, "model-640-unique", make_photos(ctx, 640, ctx.pick(32, 384))[:192]),
    }
    # The server's own decode floor (the model tagger's input_size).
    limits = DecodeLimits(
        max_image_bytes=10 * 1024 * 1024, max_pixels=50_000_000, min_side=ModelTagger.input_size
    )

    classifier = ImageNetClassifier()
    decoded = [decode_image(p.read_bytes(), limits) for p in sets["640 px"][:BATCH]]
    batch = np.stack([classifier.preprocess(img) for img in decoded])
    classifier.predict(batch)  # warm-up
    raw_rates = []
    for _ in range(ctx.pick(2, 10)):
        started = time.perf_counter()
        classifier.predict(batch)
        raw_rates.append(BATCH / (time.perf_counter() - started))
    raw = median(raw_rates)
    threads = classifier.threads
    del classifier
    section.add(
        Row(
            f"raw model: ImageNetClassifier.predict, batch of {BATCH}",
            len(raw_rates),
            raw,
            "img/s",
            note=f"{threads} intra-op threads, {len(raw_rates)} timed calls after a warm-up",
            samples=raw_rates,
        )
    )

    faces_raw, faces_rates = raw_face_rate(ctx, decoded)
    section.add(
        Row(
            f"raw people stage: FaceDetector.detect, batch of {BATCH}",
            len(faces_rates),
            faces_raw,
            "img/s",
            (1 / raw) / (1 / raw + 1 / faces_raw),
            "classifier alone over classifier + detector, raw",
            None,
            "1 intra-op thread; whole photo letterboxed to 128x128, one view per image (people.toml tiles = 1); decoding and NMS included",
            faces_rates,
        )
    )

    bars = {"raw model (batch 16)": raw}
    with (
        serve(ctx, tagger="model", startup_timeout_s=120, extra_args=BLAZEFACE_STAGES) as server,
        serve(ctx, tagger="model", startup_timeout_s=120, extra_args=CLASSIFIER_ONLY) as plain,
    ):
        for label, paths in sets.items():
            size_kb = paths[0].stat().st_size / 1024
            decode_ms, prep_ms, faces_ms = time_decode(paths, limits, ctx.pick(3, 8))
            rates, plain_rates = [], []
            before = server.stats()["batching"]
            manifest = write_manifest(ctx.work / "s5-manifest.txt", paths)
            cpu = {"with": 0.0, "without": 0.0}  # server CPU seconds over all repeats
            for _ in range(repeats):  # interleaved, so both see the same machine load
                before_cpu = plain.cpu_s()
                plain_rates.append(
                    client_rate(ctx, plain, manifest, len(paths), section, f"{label} --no-faces")
                )
                cpu["without"] += plain.cpu_s() - before_cpu
                before_cpu = server.cpu_s()
                rates.append(client_rate(ctx, server, manifest, len(paths), section, label))
                cpu["with"] += server.cpu_s() - before_cpu
            after = server.stats()["batching"]
            batches = after["batches"] - before["batches"]
            images = after["images"] - before["images"]
            mean_batch = images / batches if batches else 0.0
            rate, plain_rate = median(rates), median(plain_rates)
            bars[f"HTTP {label}"] = rate
            bars[f"HTTP {label} --no-faces"] = plain_rate
            what = f"{label} JPEGs (~{size_kb:,.0f} KiB, {len(paths)} a run, C={CONCURRENCY})"
            section.add(
                Row(
                    f"HTTP, {what}",
                    repeats,
                    rate,
                    "img/s",
                    rate / raw,
                    "ratio to raw model",
                    None,
                    f"mean batch {mean_batch:.1f} (max {after['max_batch_size']}); server decode {fmt(decode_ms)} ms/img "
                    f"+ preprocess {fmt(prep_ms)} ms/img + face views {fmt(faces_ms)} ms/img (1 thread); "
                    f"model {1000 / raw:.1f} ms/img batched",
                    rates,
                )
            )
            section.add(
                Row(f"HTTP, {what}, --no-faces", repeats, plain_rate, "img/s", plain_rate / raw, "ratio to raw model",
                    samples=plain_rates)
            )  # fmt: skip
            paired = [w / wo for w, wo in zip(rates, plain_rates, strict=True)]
            section.add(
                Row(
                    f"people stage, {label}: with faces over --no-faces",
                    repeats,
                    median(paired),
                    "",
                    median(paired),
                    ">= 0.80",
                    median(paired) >= 0.80,
                    "median of the per-repeat ratios (the two servers run alternately)",
                    paired,
                )
            )
            per_image = {k: 1000 * v / (repeats * len(paths)) for k, v in cpu.items()}
            cpu_ratio = per_image["without"] / per_image["with"] if per_image["with"] else 0.0
            section.add(
                Row(
                    f"people stage, {label}: server CPU per image, --no-faces over with faces",
                    repeats,
                    cpu_ratio,
                    "",
                    cpu_ratio,
                    ">= 0.80",
                    cpu_ratio >= 0.80,
                    f"{fmt(per_image['with'])} ms with faces, {fmt(per_image['without'])} ms without (user+sys "
                    "of the server process): the throughput ratio when the server alone is CPU-bound, and "
                    "steadier than wall-clock rates on a shared machine",
                )
            )
    section.notes.append(
        "Ratio = HTTP images/s over raw model images/s. On 2 cores the server's decode threads, its event "
        "loop, the model's 2 intra-op threads and the client all compete, so decode + preprocess time per "
        "image (single-threaded, measured on the same files) is what the HTTP path pays on top of the model."
    )
    section.notes.append(
        "Where the 3000 px path loses: decoding. decode_image draft-decodes to a short side >= "
        f"{ModelTagger.input_size} and ModelTagger.prepare then resizes, crops and normalises in the same decode "
        "thread, so only the batched model call runs on the tagger thread; the decode threads, the model's "
        "intra-op threads and the client share 2 cores."
    )
    section.plots.append(bar_plot(ctx.out / "model-throughput.png", "Model throughput", "images / s", bars))
    return section


def time_decode(paths: list[Path], limits: object, count: int) -> tuple[float, float, float]:
    """Median ms per image of the server's decode, the classifier's preprocessing and the face views."""
    from batchtag.taggers.faces import prepare_views
    from batchtag.taggers.imagenet import ImageNetClassifier

    stages = {"prepare": ImageNetClassifier.preprocess, "views": prepare_views}
    times = time_stages(paths, limits, count, stages, time.perf_counter)
    return times["decode"], times["prepare"], times["views"]


def time_stages(
    paths: list[Path],
    limits: object,
    count: int,
    stages: dict[str, Callable[[Any], Any]],
    clock: Callable[[], float] = time.thread_time,
) -> dict[str, float]:
    """Median ms per image of the server's decode ("decode") and of each stage run on the
    decoded image, one after another in this thread."""
    from batchtag.server.imaging import decode_image

    samples: dict[str, list[float]] = {"decode": [], **{name: [] for name in stages}}
    for path in paths[:count]:
        data = path.read_bytes()
        started = clock()
        image = decode_image(data, limits)  # type: ignore[arg-type]
        samples["decode"].append((clock() - started) * 1000)
        for name, stage in stages.items():
            started = clock()
            stage(image)
            samples[name].append((clock() - started) * 1000)
    return {name: median(values) for name, values in samples.items()}


def client_rate(ctx: Ctx, server: Server, manifest: Path, count: int, section: Section, label: str) -> float:
    """Images/s of one ``batchtag run`` over ``manifest`` against ``server``."""
    result = run_client(
        ctx,
        [manifest],
        ctx.work / "s5-out.jsonl",
        server.url,
        "--concurrency",
        str(CONCURRENCY),
        timeout_s=600,
    )
    assert result.summary is not None
    if result.summary["ok"] != count:
        section.notes.append(f"{label}: {result.summary['ok']} of {count} ok ({result.summary['by_code']})")
    return result.summary["ok"] / result.summary["wall_s"]


def raw_face_rate(ctx: Ctx, decoded: list[Image.Image]) -> tuple[float, list[float]]:
    """Images/s of the face detector (network, decoding, NMS) on a batch of prepared views."""
    from batchtag.taggers.faces import FaceDetector, prepare_views
    from batchtag.taggers.people import PeopleRules

    settings = PeopleRules.load().detector
    detector = FaceDetector(settings=settings)
    views = [prepare_views(image, settings) for image in decoded]
    detector.detect(views)  # warm-up
    rates = []
    for _ in range(ctx.pick(2, 10)):
        started = time.perf_counter()
        detector.detect(views)
        rates.append(len(views) / (time.perf_counter() - started))
    return median(rates), rates
