"""qcloop report in a real browser (headless Chromium driven by Playwright): the plots are
drawn, the case table pages and sorts, and the page asks nothing of the network.

Chromium is Debian's (``apt-get install chromium``; .ci/run installs it), Playwright the
Python driver from the dev extra; without either the test is skipped, saying which."""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qcloop.monitor.benchmarks.report import synthetic_output
from qcloop.monitor.report.page import CASE_COLUMNS, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser: Any, page_path: Path) -> tuple[Any, list[str]]:
    """The page loaded, and every URL it requested (the network refused)."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    requested: list[str] = []

    def route(r: Any) -> None:
        requested.append(r.request.url)
        if r.request.url.startswith(("file:", "data:")):
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)
    page.goto(page_path.as_uri())
    page.wait_for_load_state("load")
    return page, requested


def _drawn(page: Any, selector: str) -> float:
    """The fraction of non-white pixels in the element's box, as rendered."""
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(page.locator(selector).screenshot()))[..., :3]
    return float((pixels < 0.9).any(-1).mean())


def _column(page: Any, name: str) -> list[str]:
    i = CASE_COLUMNS.index(name) + 1
    return page.locator(f"#cases tbody tr td:nth-child({i})").all_text_contents()


@pytest.mark.parametrize("kind", ["assess", "monitor"])
def test_plots_are_drawn_the_table_pages_and_sorts_offline(
    browser: Any, tmp_path: Path, kind: str
) -> None:
    folder = synthetic_output(tmp_path / "out", 240, monitor=kind == "monitor")
    write_report(folder, folder / "report.html")
    page, requested = _open(browser, folder / "report.html")
    plots = ["pdc-vs-dice", "roc", "distributions", "flagged-by-vendor"]
    plots += ["monitor-timeline"] if kind == "monitor" else []
    for name in plots:
        assert _drawn(page, f"#plot-{name} img") > 0.02, name  # not a blank box
    # flagged cases, 50 a page
    flagged = sum(
        1 for line in (folder / "records.jsonl").read_text().splitlines() if '"ood": true' in line
    )
    assert page.locator("#page-info").text_content().startswith(f"{flagged} case(s), page 1 of ")
    assert len(_column(page, "case")) == 50 and set(_column(page, "OoD")) == {"true"}
    page.click("#next")
    assert "page 2 of" in page.locator("#page-info").text_content()
    # sorting by pDC: ascending, then descending on a second click
    header = page.locator("#cases th", has_text="pDC")
    header.click()
    values = [float(v) for v in _column(page, "pDC")]
    assert values == sorted(values)
    header.click()
    values = [float(v) for v in _column(page, "pDC")]
    assert values == sorted(values, reverse=True)
    # each flagged case shows its figure's thumbnail, loaded from the file beside the records
    thumbs = page.locator("#cases img.thumb")
    assert thumbs.count() == 50
    thumbs.first.scroll_into_view_if_needed()
    deadline = time.monotonic() + 10  # (no wait_for_function: the page's CSP forbids eval)
    while not any("/figures/" in u for u in requested) and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    # every case, not only the flagged ones
    page.uncheck("#flagged-only")
    assert page.locator("#page-info").text_content().startswith("240 case(s)")
    # nothing but the page itself and its figure files was asked for
    assert all(u.startswith(("file:", "data:")) for u in requested), requested
    assert any("/figures/" in u for u in requested)
    page.close()
