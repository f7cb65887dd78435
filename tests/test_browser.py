"""The page in a real browser: Playwright drives Debian's Chromium (installed by scripts/test.sh).

Walks the flow a user clicks through: the first view (heatmap + memory without a click), live
allocation (memory and figures change with C and the bit set), another sensitivity method and
view, quantize + evaluate, export, and a second session that does not see the first one's runs.
Screenshots go to ``test-artifacts/`` (git-ignored);
``MOPEQ_README_SCREENSHOT=assets/screenshot.png``
also saves the first view (1400x1000) for the README. The app runs in this process, on the
embedded model or its stand-in (see ``tests/test_app.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_app import app_url, embedded_model, standin_dir  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("MOPEQ_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: install Debian's package "
                    "(apt-get install chromium; scripts/test.sh does it) or set MOPEQ_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open(browser, url: str):
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return page


def _text(page, selector: str) -> str:
    """Text of an element's rendered content (not its progress overlay); '' if absent."""
    return page.evaluate("s => document.querySelector(s)?.textContent ?? ''", selector)


def _wait_change(page, selector: str, before: str) -> str:
    page.wait_for_function("([s, b]) => { const e = document.querySelector(s);"
                           " return e && e.textContent && e.textContent !== b; }",
                           arg=[selector, before])
    return _text(page, selector)


def _choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.locator(f"#{elem_id}").get_by_role("option", name=option, exact=True).click()


def _shot(page, name: str, full: bool = False) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full)


MEMORY = "#memory-text h3"
MEMORY_FIG = "#memory-plot .gtitle"
HEATMAP_FIG = "#heatmap .gtitle"
BITS_FIG = "#bits-plot .js-plotly-plot"


def _first_view(page) -> str:
    page.wait_for_selector("#heatmap .js-plotly-plot")
    page.wait_for_selector(MEMORY)
    page.wait_for_selector(MEMORY_FIG, state="attached")
    return _text(page, MEMORY)


def test_the_page_flow(browser, app_url):  # noqa: F811 - the fixture
    page = _open(browser, app_url)
    memory = _first_view(page)
    assert "smaller than bf16" in memory
    assert "Sensitivity: frobenius" in _text(page, HEATMAP_FIG)
    assert "MoE layers" in _text(page, "#layout-text")
    assert "cached" in _text(page, "#profile-status") or "computed" in _text(
        page, "#profile-status")
    _shot(page, "01-first-view")
    if os.environ.get("MOPEQ_README_SCREENSHOT"):  # e.g. assets/screenshot.png
        page.screenshot(path=os.environ["MOPEQ_README_SCREENSHOT"])

    # live allocation: C and the bit set change the memory text, its figure and the bits map
    figure, bits_before = _text(page, MEMORY_FIG), page.inner_html(BITS_FIG)
    clusters = page.locator("#clusters input[type=number]")
    clusters.fill("1")
    clusters.press("Enter")
    memory_c1 = _wait_change(page, MEMORY, memory)
    assert _wait_change(page, MEMORY_FIG, figure) != figure
    page.wait_for_function("([s, b]) => document.querySelector(s).innerHTML !== b",
                           arg=[BITS_FIG, bits_before])
    page.locator("#bits").get_by_label("8").check()
    assert _wait_change(page, MEMORY, memory_c1) != memory_c1
    _shot(page, "02-allocation-changed")

    # another method and view: the heatmap changes
    _choose(page, "method", "frequency")
    page.locator("#profile-btn").click()
    page.wait_for_function("document.querySelector('#profile-status [data-testid=markdown]')"
                           "?.textContent.includes('frequency')")
    page.wait_for_function(f"document.querySelector('{HEATMAP_FIG}')?.textContent"
                           ".includes('frequency')")
    _choose(page, "view-kind", "assigned bits")
    page.wait_for_function(f"document.querySelector('{HEATMAP_FIG}')?.textContent"
                           ".includes('Assigned bits')")
    _shot(page, "03-frequency-and-bits")

    # quantize + evaluate, then export
    page.locator("#quantize-btn").click()
    page.wait_for_function("document.querySelector('#run-text')?.textContent"
                           ".includes('MME score')")
    table = _text(page, "#category-table")
    for category in ("existence", "count", "position", "color", "OCR", "total"):
        assert category in table
    page.wait_for_selector("#results-plot .js-plotly-plot")
    page.wait_for_selector("#tradeoff-plot .js-plotly-plot")
    assert "#1" in _text(page, "#runs-table")
    _shot(page, "04-quantized", full=True)
    page.locator("#export-btn").click()
    page.wait_for_function("document.querySelector('#export-text')?.textContent"
                           ".includes('Recipe')")
    downloads = "".join(_text(page, "#downloads").split())  # the page splits name and suffix
    for name in ("recipe.json", "scores_", "checkpoint.zip", "gptqmodel_dynamic.py"):
        assert name in downloads
    _shot(page, "05-export", full=True)

    # a second user: the default view, none of the first user's runs or settings
    other = _open(browser, app_url)
    assert _first_view(other) == memory
    assert "#1" not in _text(other, "#runs-table")
    assert "MME score" not in _text(other, "#run-text")
    assert _text(page, MEMORY) != memory  # and the first user's page kept its own choice
    _shot(other, "06-second-session")
