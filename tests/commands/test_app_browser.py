"""The web app in a real browser: Playwright drives Debian's Chromium through an upload, a slider and an edit.

Deselected by default (``addopts``); run it with ``pytest -m browser``. It skips without gradio, Playwright or
``/usr/bin/chromium`` (``pip install -e ".[browser]"``, ``apt-get install chromium``; Playwright's own browser
download is not used). The screenshot goes to a temporary folder, or, with ``UPDATE_SCREENSHOT=1``, to
``docs/images/app.png``: then the adapter is fine-tuned with the test-bed's recommended settings, so the picture
shows a real edit (a few minutes on 2 CPU cores instead of seconds).
"""

from __future__ import annotations

import os

import PIL.Image
import pytest
from conftest import free_port

from diffusionclip_pipeline.commands import app
from diffusionclip_pipeline.testbed import render_dataset

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
SCREENSHOT = os.path.join(ROOT, "docs", "images", "app.png")
UPDATE = os.environ.get("UPDATE_SCREENSHOT") == "1"
TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """The test-bed app with one adapter ``red_to_blue``, served on a free port of this machine."""
    pytest.importorskip("gradio")
    pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    state = app.AppState.load("testbed")
    if UPDATE:  # a real edit for the README's picture
        images, settings = app.example_images(state, "red circle", 16, seed=0), {}
    else:
        images = app.example_images(state, "red circle", 2, seed=0)
        settings = dict(num_epochs=1, num_train_steps=2, num_inversion_steps=8, num_fixed_point_iterations=0)
        state.edit_defaults.update(num_inversion_steps=8, num_inference_steps=8)
    state.pipe.finetune("red circle", "blue circle", images=images, adapter_name="red_to_blue",
                        **{**state.finetune_defaults, **settings})  # fmt: skip
    demo = app.build_app(state)
    _, url, _ = app.launch(demo, port=free_port(), block=False)
    yield url
    demo.close()


def test_upload_slide_edit_in_chromium(url, tmp_path):
    from playwright.sync_api import sync_playwright

    inputs = []
    for i, image in enumerate(render_dataset(4, seed=3, colour="red")[0]):
        inputs.append(str(tmp_path / f"shape{i}.png"))
        image.save(inputs[-1])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, timeout=TIMEOUT_MS)
            page.locator("#images input[type=file]").set_input_files(inputs)
            page.wait_for_function("document.querySelectorAll('#images img').length >= 4", timeout=TIMEOUT_MS)
            page.locator("#strength input[type=range]").fill("0.9")
            assert page.locator("#strength input[type=number]").input_value() == "0.9"
            page.locator("#edit").click()
            page.wait_for_selector("#before-after img", timeout=TIMEOUT_MS)
            page.wait_for_selector("#reconstruction img", timeout=TIMEOUT_MS)
            page.wait_for_function("document.querySelectorAll('#strips img').length >= 4", timeout=TIMEOUT_MS)
            shot = SCREENSHOT if UPDATE else str(tmp_path / "app.png")
            page.screenshot(path=shot, full_page=True)
            assert page.locator("#before-after img").count() >= 1
            assert page.locator("#before-after img").first.get_attribute("src")
        finally:
            browser.close()
    with PIL.Image.open(shot) as image:
        assert image.width >= 1000
    if UPDATE:
        assert os.path.getsize(shot) < 200_000, "docs/images/app.png must stay under 200 KB"
