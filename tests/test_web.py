"""The web page in a real browser: Debian's chromium, driven by playwright, against a real uvicorn on 127.0.0.1.

Needs `apt-get install chromium` (CI installs it); ZIMAGE_MLX_SCREENSHOTS=DIR keeps screenshots for a look.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from live_server import LiveServer
from make_pipeline import save_tiny_pipeline

from zimage_mlx import ZImagePipeline, sampler
from zimage_mlx.apps.server import ServerConfig, create_app

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def server(tmp_path_factory, qwen_tokenizer_dir):
    root, _ = save_tiny_pipeline(tmp_path_factory.mktemp("zimage") / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32", quantize=None, keep_text_encoder=True)
    with LiveServer(create_app(pipe, ServerConfig(model="tiny"))) as srv:
        yield srv


@pytest.fixture
def page(server, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "install Debian's chromium (apt-get install chromium)"
    # The OpenBLAS preload the MLX tests use makes node (playwright's driver) and chromium crash: start them without.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        pw = sync_playwright().start()
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url + "/")
        yield page
        shots = os.environ.get("ZIMAGE_MLX_SCREENSHOTS")
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(shots) / f"web-{int(time.time() * 1000)}.png"), full_page=True)
    finally:
        browser.close()
        pw.stop()


@pytest.fixture
def step_delay(monkeypatch):
    """Make every denoising step take at least `seconds`, so the browser sees the job in flight."""
    real = sampler.euler_step

    def set_delay(seconds):
        def slow(*a, **kw):
            time.sleep(seconds)
            return real(*a, **kw)

        monkeypatch.setattr(sampler, "euler_step", slow)

    return set_delay


def _health(page, server):
    return page.request.get(server.url + "/health").json()


def test_generate_shows_the_preview_forming_then_the_final_image(page, server, step_delay):
    step_delay(0.15)
    page.fill("#prompt", "a red fox in the snow")
    page.select_option("#width", "256")
    page.select_option("#height", "256")
    page.eval_on_selector("#steps", "el => { el.value = 5; el.dispatchEvent(new Event('input')); }")
    page.fill("#seed", "42")
    page.click("#generate")
    # Partial previews arrive and change.
    page.wait_for_function("document.querySelector('#preview').dataset.kind === 'partial'")
    first = page.get_attribute("#preview", "src")
    page.wait_for_function("+document.querySelector('#preview').dataset.updates >= 3")
    assert page.get_attribute("#preview", "src") != first
    # Then the final image, in the preview and in the gallery with its parameters and a download link.
    page.wait_for_function("document.querySelector('#preview').dataset.kind === 'final'")
    item = page.locator("#gallery .item")
    assert item.count() == 1
    assert "a red fox in the snow" in item.locator(".params").inner_text()
    assert "seed 42" in item.locator(".params").inner_text() and "256x256" in item.locator(".params").inner_text()
    link = item.locator("a")
    assert link.get_attribute("download") == "zimage-42.png" and link.get_attribute("href").startswith("blob:")
    size = page.evaluate("(() => { const i = document.querySelector('#gallery img'); return [i.naturalWidth, i.naturalHeight]; })()")
    assert size == [256, 256]
    assert "done" in page.inner_text("#status")


def test_live_mode_only_the_last_prompt_finishes(page, server, step_delay):
    step_delay(0.3)
    page.eval_on_selector("#steps", "el => { el.value = 4; el.dispatchEvent(new Event('input')); }")
    page.select_option("#width", "512")
    page.select_option("#height", "256")
    before = _health(page, server)
    page.check("#live")
    page.fill("#prompt", "a cat")
    # The first live job is running (its previews show), then the prompt changes before it can finish.
    page.wait_for_function("document.querySelector('#preview').dataset.prompt === 'a cat'")
    assert page.get_attribute("#preview", "data-kind") == "partial"
    page.fill("#prompt", "a dog on a beach")
    page.wait_for_function("document.querySelector('#preview').dataset.kind === 'final' && "
                           "document.querySelector('#preview').dataset.prompt === 'a dog on a beach'")
    deadline = time.monotonic() + 10
    while _health(page, server)["queue"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = _health(page, server)
    assert after["completed"] - before["completed"] == 1     # only the second prompt's image finished
    assert after["cancelled"] - before["cancelled"] == 1     # the first was cancelled mid-generation
    assert page.locator("#gallery .item").count() == 0        # live results stay out of the gallery
    # Live renders are small: the 512x256 settings run at 256x128 ...
    assert page.evaluate("[document.querySelector('#preview').naturalWidth, "
                         "document.querySelector('#preview').naturalHeight]") == [256, 128]
    # ... and "Render full size" renders them at 512x256 into the gallery.
    page.click("#render")
    page.wait_for_selector("#gallery .item img")
    page.wait_for_function("document.querySelector('#gallery img').naturalWidth > 0")
    assert page.evaluate("[document.querySelector('#gallery img').naturalWidth, "
                         "document.querySelector('#gallery img').naturalHeight]") == [512, 256]
    assert "a dog on a beach" in page.inner_text("#gallery .item .params")
    live_seed = page.evaluate("liveSeed")
    assert f"seed {live_seed}" in page.inner_text("#gallery .item .params")   # the same picture, larger
