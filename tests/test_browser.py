"""The served Space in headless Chromium (Debian's system binary, driven by Playwright)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from freshnet.config_sections import SpaceConfig
from freshnet.space.bundle import build_bundle
from tests.app_helpers import ServedApp, bundle_meta
from tests.ci import in_ci

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def chromium_path() -> str:
    if not Path(CHROMIUM).exists():
        if in_ci():
            pytest.fail(
                f"chromium not found at {CHROMIUM}: .ci/run must `apt-get install -y chromium`"
            )
        pytest.skip(
            "chromium not installed (apt-get install -y chromium); CI always runs this test"
        )
    return CHROMIUM


@pytest.mark.slow
def test_upload_an_example_photo_and_read_the_top_label(
    chromium_path, space_model, example_photos, tmp_path
):
    from playwright.sync_api import expect, sync_playwright

    bundle = build_bundle(
        space_model,
        bundle_meta("v-browser"),
        example_photos,
        tmp_path / "bundle",
        SpaceConfig(title="Flowers"),
    )
    photo = example_photos[0]
    with ServedApp(bundle, tmp_path) as app, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(app.url, wait_until="domcontentloaded", timeout=120_000)
            expect(page.locator("#model-info")).to_contain_text("v-browser", timeout=120_000)
            expect(page.get_by_text("holdout accuracy")).to_be_visible()
            page.locator("#photo input[type=file]").set_input_files(str(photo))
            top = page.locator("#top5 [data-testid=label-output-value]")
            expect(top).not_to_be_empty(timeout=120_000)
            label = top.inner_text().strip()
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        finally:
            browser.close()
    import sys

    sys.path.insert(0, str(bundle))
    try:
        import app as space_app
    finally:
        sys.path.remove(str(bundle))
    expected = next(iter(space_app.Classifier(bundle / "model.pkl").predict(photo)))
    assert label == expected
    assert (tmp_path / "app.png").stat().st_size > 10_000
