"""An HTML page to look at a run's results: opens from disk, no server, no internet.

``report.html`` holds the summary, a chart of the top tags (inline SVG), the errors by code
with the failed keys, and a grid of thumbnails with their tags that a click on a tag or
the search box filters. Beside it, ``report_files/`` holds ``items.js`` (the grid's data,
one small array an item) and ``thumbs/`` (small JPEGs, made once and reused while the image
is unchanged). OUT is streamed: memory holds the counters and one chunk of items, not the
run; the page shows the grid a page at a time, so 100,000 items stay fast.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from itertools import islice
from typing import IO, Any
from urllib.parse import quote

from PIL import ImageOps

from batchtag.decoding import OverBudget, open_image_file, open_within_budget
from batchtag.errors import ReportTargetError
from batchtag.export.common import replaced_atomically
from batchtag.pipeline.formats import register_heif
from batchtag.records import Record

MARKER = "<!-- batchtag report -->"
FOLDER_MARKER = ".batchtag-report"
THUMB_SIDE = 192
THUMB_QUALITY = 70
CHUNK = 64  # items whose thumbnails are made together
TOP_TAGS = 15
FAILED_KEYS_SHOWN = 200  # per error code, in the page; the count is always exact
THUMB_WORKERS = min(4, os.cpu_count() or 1)
# Characters written as \u escapes in JSON that lands in a script (see script_json).
SCRIPT_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


@dataclass
class ErrorGroup:
    message: str
    count: int = 0
    keys: list[str] = field(default_factory=list)


@dataclass
class ReportResult:
    path: str
    items: int = 0
    ok: int = 0
    errors: int = 0
    files: int = 0
    urls: int = 0
    untagged_ok: int = 0
    attempts: int = 0
    tags: Counter[str] = field(default_factory=Counter)
    by_code: dict[int, ErrorGroup] = field(default_factory=dict)
    thumbnails_made: int = 0
    thumbnails_reused: int = 0

    def count(self, record: Record) -> None:
        self.items += 1
        self.attempts += record.attempts
        if record.source == "url":
            self.urls += 1
        else:
            self.files += 1
        if record.ok:
            self.ok += 1
            self.untagged_ok += not record.tags
            self.tags.update(dict.fromkeys((t["tag_name"] for t in record.tags), 1))
            return
        self.errors += 1
        group = self.by_code.setdefault(record.code, ErrorGroup(record.message))
        group.count += 1
        if len(group.keys) < FAILED_KEYS_SHOWN:
            group.keys.append(record.key)


# --------------------------------------------------------------------------- thumbnails


def thumbnail_name(key: str) -> str:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest() + ".jpg"


def existing_thumbnail(record: Record, folder: str) -> tuple[str | None, bool]:
    """(thumbnail name, whether it must be made): an existing thumbnail newer than its image
    is reused; a URL or a file that is gone has none. Two stats, no thread."""
    if record.source != "file":
        return None, False
    name = thumbnail_name(record.key)
    try:
        source_mtime = os.stat(record.key).st_mtime
    except (OSError, ValueError):
        return None, False
    try:
        return name, os.stat(os.path.join(folder, name)).st_mtime < source_mtime
    except OSError:
        return name, True


def make_thumbnail(image_path: str, thumb_path: str) -> bool:
    """A small JPEG of the image, upright; False when the image cannot be read, is not a
    regular file (a FIFO named in OUT must not block) or is over the decoding budget (a
    JPEG counted at the reduced scale it is decoded at)."""
    try:
        with (
            open_image_file(image_path) as source,
            open_within_budget(source, draft=("RGB", (THUMB_SIDE, THUMB_SIDE))) as image,
        ):
            small = ImageOps.exif_transpose(image).convert("RGB")
            small.thumbnail((THUMB_SIDE, THUMB_SIDE))
            with replaced_atomically(thumb_path, "wb", durable=False) as handle:
                small.save(handle, "JPEG", quality=THUMB_QUALITY, optimize=True)
    except (OSError, ValueError, SyntaxError, OverBudget):
        return False
    return True


def thumbnails_for(
    chunk: list[Record], folder: str, pool: ThreadPoolExecutor, result: ReportResult
) -> list[str | None]:
    """Each record's thumbnail name (None: no thumbnail), making the missing ones in threads."""
    found = [existing_thumbnail(record, folder) for record in chunk]
    to_make = [(i, name) for i, (name, needed) in enumerate(found) if name and needed]
    names = [name for name, _ in found]
    made = pool.map(lambda job: make_thumbnail(chunk[job[0]].key, os.path.join(folder, job[1])), to_make)
    for (i, _), ok in zip(to_make, made, strict=True):
        result.thumbnails_made += ok
        if not ok:
            names[i] = None
    result.thumbnails_reused += sum(1 for name, needed in found if name and not needed)
    return names


# --------------------------------------------------------------------------- the page


def files_folder(report_path: str) -> str:
    """``report.html`` -> ``report_files`` beside it (the name browsers use when saving)."""
    stem = os.path.splitext(os.path.basename(report_path))[0]
    return os.path.join(os.path.dirname(os.path.abspath(report_path)), f"{stem}_files")


def check_targets(report_path: str, folder: str) -> None:
    """Only our own report and folder are ever replaced or written into."""
    if os.path.lexists(report_path):
        ours = False
        if os.path.isfile(report_path):
            with open(report_path, "rb") as handle:
                ours = MARKER.encode() in handle.read(4096)
        if not ours:
            raise ReportTargetError(f"{report_path} exists and is not a batchtag report; not overwriting it")
    if os.path.lexists(folder) and not os.path.isfile(os.path.join(folder, FOLDER_MARKER)):
        raise ReportTargetError(f"{folder} exists and is not a batchtag report's folder; not writing into it")


def item_row(record: Record, thumb: str | None) -> list[Any]:
    """One grid item as a compact array: key, ok, code, [[tag, confidence]...], thumbnail."""
    tags = [[t["tag_name"], t["tag_confidence"]] for t in record.tags]
    return [record.key, int(record.ok), record.code, tags, thumb or ""]


def write_items(
    records: Iterable[Record], handle: IO[str], thumbs: str, result: ReportResult, progress: Any
) -> None:
    """Stream the records into ``items.js``, thumbnails made a chunk at a time in threads."""
    handle.write("window.BATCHTAG_ITEMS = [\n")
    records = iter(records)
    with ThreadPoolExecutor(THUMB_WORKERS) as pool:
        while chunk := list(islice(records, CHUNK)):
            for record, thumb in zip(chunk, thumbnails_for(chunk, thumbs, pool, result), strict=True):
                result.count(record)
                handle.write(script_json(item_row(record, thumb)))
                handle.write(",\n")
            if progress is not None:
                progress.set_postfix(thumbnails=result.thumbnails_made, refresh=False)
    handle.write("];\n")


def tag_chart(tags: Counter[str]) -> str:
    """Top tags as horizontal bars in inline SVG; each bar filters the grid when clicked."""
    top = tags.most_common(TOP_TAGS)
    if not top:
        return '<p class="muted">No tags.</p>'
    label_w, bar_w, row_h = 150, 420, 19
    most = top[0][1]
    rows = []
    for i, (name, count) in enumerate(top):
        y = i * row_h
        width = max(2, round(bar_w * count / most))
        label = html.escape(name)
        rows.append(
            f'<g class="bar" data-tag="{label}" transform="translate(0,{y})" role="button" tabindex="0">'
            f"<title>{label}: {count:,}</title>"
            f'<text x="{label_w - 8}" y="14" text-anchor="end">{label}</text>'
            f'<rect x="{label_w}" y="3" width="{width}" height="{row_h - 5}" rx="3"></rect>'
            f'<text class="n" x="{label_w + width + 6}" y="14">{count:,}</text></g>'
        )
    height = len(top) * row_h
    return (
        f'<svg class="chart" viewBox="0 0 {label_w + bar_w + 70} {height}" width="{label_w + bar_w + 70}" '
        f'height="{height}" role="img" aria-label="top tags">{"".join(rows)}</svg>'
    )


def errors_table(by_code: dict[int, ErrorGroup]) -> str:
    if not by_code:
        return '<p class="muted">No errors.</p>'
    rows = []
    for code, group in sorted(by_code.items(), key=lambda item: -item[1].count):
        keys = "".join(f"<li>{html.escape(k)}</li>" for k in group.keys)
        more = group.count - len(group.keys)
        if more > 0:
            keys += f'<li class="muted">and {more:,} more</li>'
        rows.append(
            f'<tr><td class="code">{code}</td><td>{html.escape(group.message)}</td>'
            f'<td class="num">{group.count:,}</td>'
            f"<td><details><summary>failed keys</summary><ul>{keys}</ul></details></td></tr>"
        )
    return (
        '<table class="errors"><thead><tr><th>code</th><th>message</th><th>items</th><th></th></tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def summary_html(result: ReportResult, out_name: str) -> str:
    facts = [
        ("items", result.items),
        ("ok", result.ok),
        ("errors", result.errors),
        ("files", result.files),
        ("URLs", result.urls),
        ("ok without tags", result.untagged_ok),
        ("distinct tags", len(result.tags)),
        ("requests", result.attempts),
    ]
    cells = "".join(f'<div class="fact"><b>{value:,}</b><span>{label}</span></div>' for label, value in facts)
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        f'<h1>batchtag report <span class="muted">{html.escape(out_name)} · {made}</span></h1>'
        f'<div class="facts">{cells}</div>'
    )


def script_json(value: Any) -> str:
    """JSON that is safe inside a ``<script>`` element or a script file: ``<``, ``>`` and
    ``&`` as ``\\u`` escapes (so ``</script>`` or ``<!--`` in a tag name cannot end or
    comment out the script), and U+2028/U+2029, which old JavaScript engines read as line
    ends. The escapes only ever occur inside JSON strings, so the value is unchanged."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escape in SCRIPT_ESCAPES.items():
        text = text.replace(char, escape)
    return text


def content_security_policy(nonce: str) -> str:
    """Only the report's own two scripts (and its one style sheet) run, marked with a nonce
    made for this page; no inline event handler, no other script, no network: a tag name
    that escaped its escaping still could not run or send anything anywhere."""
    return (
        "default-src 'none'; "
        f"script-src 'nonce-{nonce}'; "
        f"style-src 'nonce-{nonce}'; "
        "img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'"
    )


def fill_placeholders(template: str, parts: dict[str, str]) -> str:
    """Every placeholder replaced in one pass over the template: a value that contains a
    placeholder's name (a tag called ``__THUMBS__``) stays as it is, never replaced again."""
    pattern = re.compile("|".join(re.escape(name) for name in parts))
    return pattern.sub(lambda match: parts[match.group(0)], template)


def render_page(result: ReportResult, out_name: str, folder_name: str) -> str:
    """The page. Each value is escaped for where it lands: HTML text and attributes with
    ``html.escape`` (quotes included), the script's one value with ``script_json``."""
    template = resources.files("batchtag.export").joinpath("report_template.html").read_text("utf-8")
    nonce = secrets.token_urlsafe(18)
    parts = {
        "__CSP__": html.escape(content_security_policy(nonce)),
        "__NONCE__": nonce,
        "__TITLE__": html.escape(f"batchtag report: {out_name}"),
        "__SUMMARY__": summary_html(result, out_name),
        "__CHART__": tag_chart(result.tags),
        "__ERRORS__": errors_table(result.by_code),
        "__ITEMS_JS__": html.escape(quote(folder_name) + "/items.js"),
        "__THUMBS__": script_json(quote(folder_name) + "/thumbs/"),
    }
    return fill_placeholders(template, parts)


def write_report(
    records: Iterable[Record], report_path: str, source_name: str = "", progress: Any = None
) -> ReportResult:
    folder = files_folder(report_path)
    check_targets(report_path, folder)
    thumbs = os.path.join(folder, "thumbs")
    os.makedirs(thumbs, exist_ok=True)
    with open(os.path.join(folder, FOLDER_MARKER), "w", encoding="utf-8") as marker:
        marker.write("made by batchtag report; rewritten by the next report to this path\n")
    result = ReportResult(path=report_path)
    register_heif()  # HEIC photos get thumbnails too
    with replaced_atomically(os.path.join(folder, "items.js"), "w", encoding="utf-8") as handle:
        write_items(records, handle, thumbs, result, progress)
    page = render_page(result, source_name, os.path.basename(folder))
    with replaced_atomically(report_path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return result
