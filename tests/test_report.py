"""batchtag report: the page loaded from disk in headless Chromium, driven by Playwright."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import sync_playwright

from tests.export_helpers import CHROMIUM_FLAGS, generated_out, require_tool
from tests.support import run_cli


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
    page.page.wait_for_function(
        "[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
    )


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
    page.page.wait_for_function("document.querySelectorAll('#grid figure').length === 1")
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


def test_a_100k_item_report_renders_its_first_page_quickly_and_filters(tmp_path, browser):
    out = tmp_path / "big.jsonl"
    tags = ["猫", "dog", "海滩", "sunset", "咖啡", "building", "人物", "car"]
    generated_out(out, 100_000, tags)
    report = tmp_path / "big.html"
    done = run_cli("report", out, "-o", report)
    assert done.returncode == 0, done.stderr

    started = time.monotonic()
    page = Page(browser, report.as_uri())
    page.page.wait_for_function("document.querySelectorAll('#grid figure').length === 60", timeout=20_000)
    first_page_s = time.monotonic() - started
    assert first_page_s < 10, f"first page after {first_page_s:.1f} s"  # generous: a correctness bound
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
