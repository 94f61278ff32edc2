"""PNG plots: matplotlib with the Agg backend (no display needed) when the bench extras are
installed; otherwise a plain Pillow drawing, so ``make test`` (test extras only) still gets
its PNGs from the smoke run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # bench extras not installed
    plt = None

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def line_plot(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    xs: Sequence[float],
    series: dict[str, Sequence[float]],
    logx: bool = False,
    logy: bool = False,
    hlines: dict[str, float] | None = None,
) -> str:
    if plt is None:
        _pil_lines(path, title, xs, series, logx, logy, hlines or {})
        return path.name
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for label, ys in series.items():
        ax.plot(list(xs)[: len(ys)], list(ys), marker="o" if len(ys) < 30 else None, label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="grey", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path.name


def bar_plot(path: Path, title: str, ylabel: str, values: dict[str, float]) -> str:
    if plt is None:
        _pil_bars(path, title, values)
        return path.name
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    names = list(values)
    ax.bar(range(len(names)), [values[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=15, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path.name


# --- the Pillow fallback: crude but readable ------------------------------------------------------

W, H, LEFT, RIGHT, TOP, BOTTOM = 700, 420, 70, 20, 40, 50


def _scale(values: list[float], log: bool) -> tuple[float, float]:
    finite = [v for v in values if v == v and (not log or v > 0)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    elif lo > 0:
        lo = 0.0
    return (lo, hi) if hi > lo else (lo - 1, hi + 1)


def _pil_lines(path: Path, title: str, xs: Sequence[float], series: dict[str, Sequence[float]],
               logx: bool, logy: bool, hlines: dict[str, float]) -> None:  # fmt: skip
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    all_y = [float(y) for ys in series.values() for y in ys] + list(hlines.values())
    x0, x1 = _scale([float(x) for x in xs], logx)
    y0, y1 = _scale(all_y, logy)

    def point(x: float, y: float) -> tuple[float, float]:
        fx = math.log10(x) if logx and x > 0 else x
        fy = (math.log10(y) if y > 0 else y0) if logy else y
        return (
            LEFT + (fx - x0) / (x1 - x0) * (W - LEFT - RIGHT),
            H - BOTTOM - (fy - y0) / (y1 - y0) * (H - TOP - BOTTOM),
        )

    draw.rectangle((LEFT, TOP, W - RIGHT, H - BOTTOM), outline="black")
    draw.text((LEFT, 10), title, fill="black")
    draw.text((4, TOP), f"{(10**y1 if logy else y1):.3g}", fill="black")
    draw.text((4, H - BOTTOM - 10), f"{(10**y0 if logy else y0):.3g}", fill="black")
    for index, (label, ys) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        points = [point(float(x), float(y)) for x, y in zip(xs, ys, strict=False)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((LEFT + 10, TOP + 8 + 14 * index), label, fill=colour)
    for label, y in hlines.items():
        _, py = point(float(xs[0]) if xs else 1.0, y)
        draw.line([(LEFT, py), (W - RIGHT, py)], fill="grey")
        draw.text((W - RIGHT - 150, py - 12), label, fill="grey")
    image.save(path, "PNG")


def _pil_bars(path: Path, title: str, values: dict[str, float]) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    draw.text((LEFT, 10), title, fill="black")
    top = max([v for v in values.values() if v == v] + [1e-9])
    width = (W - LEFT - RIGHT) / max(1, len(values))
    for index, (name, value) in enumerate(values.items()):
        x = LEFT + index * width
        y = H - BOTTOM - (value / top) * (H - TOP - BOTTOM) if value == value else H - BOTTOM
        draw.rectangle((x + 5, y, x + width - 5, H - BOTTOM), fill=COLOURS[0])
        draw.text((x + 5, H - BOTTOM + 5), name[:22], fill="black")
        draw.text((x + 5, y - 12), f"{value:.3g}", fill="black")
    image.save(path, "PNG")
