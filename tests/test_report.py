"""batchtag report: the page loaded from disk in headless Chromium, driven by Playwright."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import sync_playwright

from batchtag.records import Record
from tests.export_helpers import CHROMIUM_FLAGS, EXAMPLES, generated_out, require_tool
from tests.support import run_cli, wait_until


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """The system Chromium (`make test` installs it), never a browser Playwright downloads."""
    executable = require_tool("chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


class Page:
    """A page with every console error and uncaught exception collected."""

    def __init__(self, browser, url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.problems: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(m.text))
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))
        self.page.goto(url)

    def wait_for(self, expression: str, timeout: float = 30) -> None:
        """Poll a JavaScript expression from outside the page: Playwright's own
        ``wait_for_function`` evaluates strings inside it, which the report's
        Content-Security-Policy rightly forbids."""
        wait_until(lambda: self.page.evaluate(expression), timeout, expression)

    def cards(self) -> list[dict]:
        return self.page.eval_on_selector_all(
            "#grid figure",
            """figures => figures.map(f => ({
                key: f.dataset.key,
                tags: [...f.querySelectorAll('.tag')].map(t => t.dataset.tag),
                img: f.querySelector('img') ? f.querySelector('img').getAttribute('src') : null,
                loaded: f.querySelector('img') ? f.querySelector('img').naturalWidth : 0,
            }))""",
        )


def wait_for_images(page: Page) -> None:
    page.wait_for("[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)")


def test_report_of_a_real_run_shows_thumbnails_tags_errors_and_filters_by_tag(
    tagged_photos, tmp_path, browser
):
    report = tmp_path / "report.html"
    done = run_cli("report", tagged_photos.out, "-o", report)
    assert done.returncode == 0, done.stderr
    assert "7 thumbnails made" in done.stderr
    records = tagged_photos.records()
    page = Page(browser, report.as_uri())

    wait_for_images(page)
    cards = page.cards()
    assert {c["key"] for c in cards} == {r.key for r in records}
    with_thumbs = [c for c in cards if c["img"]]
    assert len(with_thumbs) == 7 and all(
        c["loaded"] > 0 for c in with_thumbs
    )  # the broken file and URL have none
    by_key = {c["key"]: c for c in cards}
    for record in records:
        assert by_key[record.key]["tags"] == [t["tag_name"] for t in record.tags]
    assert "猫" in page.page.inner_text("#top-tags")

    errors = page.page.inner_text("#errors")
    for record in (r for r in records if not r.ok):
        assert str(record.code) in errors
    page.page.click("#errors summary >> nth=0")
    assert any(r.key in page.page.inner_text("#errors") for r in records if not r.ok)

    page.page.click("#grid figure[data-key$='/coffee.jpg'] .tag[data-tag='咖啡']")
    assert [c["key"] for c in page.cards()] == [r.key for r in records if r.key.endswith("/coffee.jpg")]
    page.page.click("#clear-tag")
    assert len(page.cards()) == len(records)

    page.page.click(".chart .bar[data-tag='猫']")  # the chart filters too
    cats = {r.key for r in records if any(t["tag_name"] == "猫" for t in r.tags)}
    assert {c["key"] for c in page.cards()} == cats and len(cats) == 2
    page.page.click("#clear-tag")

    page.page.fill("#search", "rocket")
    page.wait_for("document.querySelectorAll('#grid figure').length === 1")
    assert page.cards()[0]["key"].endswith("/rocket_falcon9.jpg")
    assert page.problems == []


def test_thumbnails_are_made_once_and_reused(tagged_photos, tmp_path):
    report = tmp_path / "report.html"
    assert run_cli("report", tagged_photos.out, "-o", report).returncode == 0
    thumbs = sorted((tmp_path / "report_files" / "thumbs").iterdir())
    stamps = [p.stat().st_mtime_ns for p in thumbs]
    again = run_cli("report", tagged_photos.out, "-o", report)
    assert again.returncode == 0 and "0 thumbnails made, 7 reused" in again.stderr
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "report_files" / "thumbs").iterdir())] == stamps


def test_a_page_that_is_not_a_report_is_never_overwritten(tagged_photos, tmp_path):
    page = tmp_path / "index.html"
    page.write_text("<html>my homepage</html>")
    done = run_cli("report", tagged_photos.out, "-o", page)
    assert done.returncode == 2 and "not a batchtag report" in done.stderr
    assert page.read_text() == "<html>my homepage</html>" and not (tmp_path / "index_files").exists()


def test_a_100k_item_report_renders_its_first_page_and_filters(tmp_path, browser):
    out = tmp_path / "big.jsonl"
    tags = ["猫", "dog", "海滩", "sunset", "咖啡", "building", "人物", "car"]
    generated_out(out, 100_000, tags)
    report = tmp_path / "big.html"
    done = run_cli("report", out, "-o", report)
    assert done.returncode == 0, done.stderr

    started = time.monotonic()
    page = Page(browser, report.as_uri())
    page.wait_for("document.querySelectorAll('#grid figure').length === 60", timeout=20)
    first_page_s = time.monotonic() - started
    assert page.page.inner_text("#count").replace(",", "").startswith("100000 of 100000")

    expected = sum(1 for line in out.read_text(encoding="utf-8").splitlines() if '"tag_name":"海滩"' in line)
    page.page.click("#grid .tag[data-tag='海滩'] >> nth=0")
    count = page.page.inner_text("#count").replace(",", "")
    assert count.startswith(f"{expected} of 100000")
    assert all("海滩" in c["tags"] for c in page.cards())
    page.page.click("#next")
    assert all("海滩" in c["tags"] for c in page.cards()) and "page 2 of" in page.page.inner_text("#page")
    assert page.problems == []
    print(json.dumps({"first_page_s": round(first_page_s, 2)}))


# --------------------------------------------------------------------------- hostile OUT

SENTINEL = "window.pwned"
HOSTILE_TAGS = [
    "__THUMBS__ autofocus onfocus=window.pwned=1 x=",  # broke out of data-tag when filled twice
    '" autofocus onfocus="window.pwned=1',
    "' autofocus onfocus='window.pwned=1",
    "</script><script>window.pwned=1</script>",
    "<!--<script>",
    "__CHART__ __ERRORS__ __SUMMARY__ __ITEMS_JS__ __NONCE__ __CSP__",
    "<svg onload=window.pwned=1>",
    "line\u2028separator\u2029para",
    "&quot; onmouseover=&quot;window.pwned=1",
]
HOSTILE_NAMES = ["<img src=x onerror=window.pwned=1>.jpg", '"><svg onload=window.pwned=1>.jpg']
HOSTILE_URLS = ["javascript:window.pwned=1", "javascript:/*</script><script>*/window.pwned=1//"]


def hostile_out(root, photo_bytes: bytes):
    """An OUT crafted as an attacker would: tag names, file names, URL keys and error
    messages that try every way out of their place in the page."""
    photos = root / "photos"
    photos.mkdir()
    records = []
    for i, name in enumerate(HOSTILE_NAMES):
        path = photos / name
        path.write_bytes(photo_bytes)
        tags = [{"tag_name": tag, "tag_confidence": 90 - i} for tag in HOSTILE_TAGS]
        records.append(Record(str(path), "file", "ok", 0, "success", tags, 1))
    for url in HOSTILE_URLS:
        records.append(Record(url, "url", "error", -1505, "<img src=x onerror=window.pwned=1>", [], 1))
    records.append(
        Record(
            str(photos / "gone.jpg"),
            "file",
            "error",
            -1102,
            "</script><script>window.pwned=1</script>",
            [],
            1,
        )
    )
    out = root / 'out"><svg onload=window.pwned=1>.jsonl'
    out.write_bytes(b"".join(record.to_line() for record in records))
    return out, records


def visit_everything(page: Page) -> None:
    """Give every injected handler its chance: focus, hover and click each tag and bar."""
    for selector in ("#grid .tag", ".chart .bar"):
        for i in range(len(page.page.query_selector_all(selector))):
            target = page.page.locator(selector).nth(i)  # found again: a click redraws the grid
            target.focus()
            target.hover()
            target.click()
            if page.page.query_selector("#clear-tag"):
                page.page.click("#clear-tag")
    page.page.keyboard.press("Tab")


def test_a_crafted_out_cannot_run_script_in_the_report_and_the_page_still_works(tmp_path, browser):
    out, records = hostile_out(tmp_path, (EXAMPLES / "coffee.jpg").read_bytes())
    report = tmp_path / "report.html"
    done = run_cli("report", out, "-o", report)
    assert done.returncode == 0, done.stderr
    page = Page(browser, report.as_uri())
    dialogs: list[str] = []
    page.page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

    page.wait_for(f"document.querySelectorAll('#grid figure').length === {len(records)}")
    page.wait_for("[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.page.evaluate(f"typeof {SENTINEL}") == "undefined"  # the attack ran on load, no click
    visit_everything(page)

    assert page.page.evaluate(f"typeof {SENTINEL}") == "undefined" and dialogs == []
    assert page.problems == []  # nothing even tried: the CSP had nothing to block
    cards = {c["key"]: c for c in page.cards()}
    assert cards.keys() == {r.key for r in records}
    for record in records:  # every value shown as the literal text it is
        assert cards[record.key]["tags"] == [t["tag_name"] for t in record.tags]
    assert sum(1 for c in cards.values() if c["loaded"]) == len(HOSTILE_NAMES)
    bars = page.page.eval_on_selector_all(".chart .bar", "bars => bars.map(b => b.dataset.tag)")
    assert sorted(bars) == sorted(HOSTILE_TAGS)
    page.page.click("#errors summary >> nth=0")
    assert "<img src=x onerror=window.pwned=1>" in page.page.inner_text("#errors")
    assert out.name in page.page.inner_text("header")
    page.page.fill("#search", "</script>")
    matches = [r for r in records if "</script>" in r.key + "".join(t["tag_name"] for t in r.tags)]
    page.wait_for(f"document.querySelectorAll('#grid figure').length === {len(matches)}")
    assert page.page.evaluate(f"typeof {SENTINEL}") == "undefined"


def test_the_pages_csp_stops_markup_that_slipped_past_escaping_but_runs_the_reports_own_scripts(
    tmp_path, browser
):
    """The second wall: markup pasted into a report as if an escaping bug let it through."""
    out = tmp_path / "out.jsonl"
    generated_out(out, 100, ["猫", "dog"])
    report = tmp_path / "report.html"
    assert run_cli("report", out, "-o", report).returncode == 0
    injected = (
        '<img src="x" onerror="window.pwned=1"><svg onload="window.pwned=2"></svg>'
        '<script>window.pwned=3</script><button autofocus onfocus="window.pwned=4">x</button>'
        '<a id="js" href="javascript:window.pwned=5">link</a><script src="data:,window.pwned=6"></script>'
    )
    report.write_text(report.read_text(encoding="utf-8").replace("<header>", "<header>" + injected), "utf-8")
    page = Page(browser, report.as_uri())
    page.wait_for("document.querySelectorAll('#grid figure').length === 60")  # our scripts ran
    page.page.click("#js")
    page.page.hover("img[src=x]")
    assert page.page.evaluate(f"typeof {SENTINEL}") == "undefined"
    assert any("Content Security Policy" in problem for problem in page.problems)


def test_script_json_keeps_values_and_leaves_nothing_that_ends_a_script():
    from batchtag.export.report import script_json

    value = ["</script><!--", "a&b", "\u2028\u2029", "猫"]
    text = script_json(value)
    assert json.loads(text) == value
    assert not set(text) & {"<", ">", "&", "\u2028", "\u2029"}
