"""The demo page in a real headless Chromium (Debian `chromium`, driven by playwright; no browser download)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"chromium not found at {CHROMIUM}: apt-get update && apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def test_text_query_renders_image_results(served_app: dict, browser, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(served_app["url"] + "/")
    assert "CMAN" in page.title()
    page.fill("#text", "a large red circle on the left")
    page.select_option("#target", "image")
    page.fill("#k", "6")
    page.click("#search")
    page.wait_for_selector("body[data-state=done]", timeout=60_000)
    cards = page.locator("#results .card")
    assert cards.count() == 6
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=30_000,
    )
    widths = page.eval_on_selector_all("#results img", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) == 6 and all(w > 0 for w in widths)
    assert page.locator("#results audio").count() == 6
    assert page.locator("#results .caption").first.inner_text().strip()
    assert "image results for text" in page.inner_text("#status")
    shot = page.screenshot(path=str(tmp_path / "demo_page.png"), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "demo_page.png").write_bytes(shot)

    # an error from the server is shown, not swallowed: k out of range
    page.fill("#k", "500")
    page.evaluate("document.getElementById('k').removeAttribute('max')")
    page.click("#search")
    page.wait_for_function("() => document.getElementById('error').textContent.length > 0", timeout=30_000)
    assert "k must be between 1 and 100" in page.inner_text("#error")
    assert not errors, errors
    page.close()
