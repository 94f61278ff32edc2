"""Section 10: what the new stages cost: 640 px images/s of the default tagger before issue 18
and of today's, alternating in one run.

Before issue 18 the embedded default was the float classifier + BlazeFace
(``--stages classifier,blazeface --float-classifier``); now it is the INT8 classifier + the
YOLOX-nano detector (no options); the optional CenterFace stage (where the detector sees 3+
people) is measured beside. All run as
``batchtag run`` with no endpoint on the same files, back to back, on two sets:
- real photos: the evaluation set (bench/quality/photos, COCO photos of about 640 x 480; a
  third have several people, so CenterFace's share of the cost is real);
- the generated 640 px set of sections 5 and 8 (the example photos resized).
Rate = (n - 1) / (wall of the n-image run - wall of a 1-image run of the same options), as in
section 8; the ratio is the median of the pairs (new / before); the goal is >= 1.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import (
    ChildResult,
    Ctx,
    Row,
    Section,
    fmt,
    median,
    run_client,
    unique_copies,
    write_manifest,
)
from bench.plots import bar_plot
from bench.quality.dataset import PHOTOS as QUALITY_PHOTOS
from bench.s5_model import make_photos
from bench.s8_embedded import check_ok, marginal

GOAL = 1.0
BEFORE = ("--stages", "classifier,blazeface", "--float-classifier")
CONFIGS = {
    "before issue 18 (float classifier + BlazeFace)": BEFORE,
    "now (default stages: INT8 classifier + detector)": (),
    "now with faces (--stages classifier,detector,faces)": ("--stages", "classifier,detector,faces"),
}


def run(ctx: Ctx) -> Section:
    section = Section("stages", "10. The new stages' cost: 640 px images/s, default before issue 18 vs now")
    real = sorted(QUALITY_PHOTOS.glob("*.jpg"))[: ctx.pick(12, 200)]
    sets = {
        f"{len(real)} real photos (bench/quality)": unique_copies(ctx, "quality-unique", real),
        "generated 640 px": unique_copies(ctx, "photos-640-unique", make_photos(ctx, 640, ctx.pick(12, 384))),
    }
    repeats = ctx.pick(1, 3)
    bars = {}
    for label, paths in sets.items():
        manifest = write_manifest(ctx.work / "s10-set.txt", paths)
        single = write_manifest(ctx.work / "s10-one.txt", paths[:1])
        rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
        cpu: dict[str, list[float]] = {name: [] for name in CONFIGS}
        ratios: list[float] = []
        others: list[float] = []
        for _ in range(repeats):
            for name, options in CONFIGS.items():
                start = embedded(ctx, section, single, 1, f"{name}, 1 image", options)
                full = embedded(ctx, section, manifest, len(paths), f"{name}, {label}", options)
                rate, ms = marginal(full, start, len(paths))
                rates[name].append(rate)
                cpu[name].append(ms)
            before, now = (rates[name][-1] for name in list(CONFIGS)[:2])
            ratios.append(now / before)
            others.append(rates[list(CONFIGS)[2]][-1] / before)
        first = next(iter(CONFIGS))
        for index, name in enumerate(CONFIGS):
            is_now = index == 1
            ratio = median(ratios) if is_now else median(others) if index == 2 else None
            section.add(
                Row(
                    f"{label}: {name}",
                    repeats,
                    median(rates[name]),
                    "img/s",
                    ratio,
                    f">= {GOAL} of before" if is_now else "of before (reported)" if index == 2 else "",
                    (ratio >= GOAL) if is_now and ratio is not None else None,
                    f"{fmt(median(cpu[name]))} ms CPU an image; start-up subtracted"
                    + (
                        f"; CPU an image before / this: {median(cpu[first]) / median(cpu[name]):.2f} "
                        "(the images/s ratio on 2 saturated cores, steadier under load)"
                        if index
                        else ""
                    )
                    + ("; ratio = median of the pairs run back to back" if index else ""),
                    rates[name],
                )
            )
            bars[f"{name.split(' (')[0]}, {label.split(' (')[0]}"] = median(rates[name])
    section.notes.append(
        "Both defaults on the same files, alternating; every model runs on one intra-op thread but the "
        "float classifier (2 on this machine). Tag quality of the same configurations: section 9."
    )
    section.plots.append(
        bar_plot(ctx.out / "stages-throughput.png", "Default tagger, 640 px", "images / s", bars)
    )
    return section


def embedded(
    ctx: Ctx, section: Section, source: Path, n: int, label: str, options: tuple[str, ...]
) -> ChildResult:
    result = run_client(ctx, [source], ctx.work / "s10-out.jsonl", "local", "--concurrency", "32", *options)
    check_ok(section, label, result.summary, n)
    return result
