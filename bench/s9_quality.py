"""Section 9: tag quality of the embedded model on the evaluation set (bench/quality).

Recall (share of labelled things found) and precision (share of returned tags that are
right) for the classifier alone, each stage added and the final tagger, on the tuning half
and on the held-out half, at the threshold chosen on the tuning half. The full report (with
confidence bands and what was missed) goes to ``quality.md`` beside latest.md.
"""

from __future__ import annotations

from bench.common import Ctx, Row, Section
from bench.quality.dataset import HALVES, load
from bench.quality.evaluate import THRESHOLD_RULE, pair, report, run_all

QUICK_PHOTOS = 3  # per half: enough to exercise every configuration


def run(ctx: Ctx) -> Section:
    section = Section("quality", "9. Tag quality: recall / precision on the evaluation set (bench/quality)")
    photos, vocabulary = load()
    if ctx.quick:
        photos = [p for half in HALVES for p in [q for q in photos if q.half == half][:QUICK_PHOTOS]]
    results, default = run_all(photos, vocabulary)
    for result in results:
        for half in HALVES:
            chosen = result.chosen[half]
            note = f"{chosen.found}/{chosen.things} things found, {chosen.right}/{chosen.returned} tags right"
            if default is not None:
                note += f"; at the default {default}: {pair(result.at_default[half])}"
            section.add(
                Row(
                    f"{result.config}, {half} half, min confidence {result.threshold}",
                    1,
                    pair(chosen),
                    "recall / precision",
                    note=note,
                )
            )
    (ctx.out / "quality.md").write_text(report(results, photos, default), encoding="utf-8")
    tuning = sum(1 for p in photos if p.half == "tune")
    section.notes += [
        f"{len(photos)} photos ({tuning} tuning, {len(photos) - tuning} held-out); threshold per "
        f"configuration: {THRESHOLD_RULE}. Full report: quality.md.",
    ]
    return section
