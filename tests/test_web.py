"""The web page in a real browser: Debian's chromium, driven by playwright, against a real uvicorn on 127.0.0.1.

One tiny Turbo pipeline with a ControlNet and a LoRA ("style") behind the server, with an on-disk history. Every
mode runs end to end and its image is compared pixel for pixel with the Python API's; the painted mask is read back
pixel by pixel. A screenshot per mode is kept in $ZIMAGE_MLX_SCREENSHOTS (default tests/artifacts/web/).
Needs `apt-get install chromium` (CI installs it).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from live_server import LiveServer, wait_for
from make_controlnet import make_tiny_controlnet, save_tiny_controlnet
from make_lora import as_peft, random_lora, save
from make_pipeline import save_tiny_pipeline

from zimage_mlx import ZImagePipeline, sampler
from zimage_mlx.apps.openai_request import openai_mask
from zimage_mlx.apps.server import ServerConfig, create_app

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 30_000
SIDE, STEPS = 64, 3
MAX_BODY = 8 * 2**20
SHOTS = Path(os.environ.get("ZIMAGE_MLX_SCREENSHOTS") or Path(__file__).parent / "artifacts" / "web")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("web")
    root, models = save_tiny_pipeline(tmp / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    save_tiny_controlnet(tmp / "controlnet", make_tiny_controlnet(5, "2.1"))
    lora = save(tmp / "style.safetensors", as_peft(random_lora(models["transformer"], strength=0.3, seed=3)))
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32", quantize=None, keep_text_encoder=True,
                                          controlnet=tmp / "controlnet")
    pipe.load_lora_weights(lora, adapter_name="style")
    return pipe, tmp


def _serve(pipe, history_dir, **kw):
    config = ServerConfig(model="tiny", loras={"style": 0.5}, history_dir=history_dir, max_body=MAX_BODY, **kw)
    srv = LiveServer(create_app(pipe, config))
    srv.history_dir, srv.app = history_dir, srv.server.config.app
    return srv


@pytest.fixture(scope="module")
def server(tiny):
    with _serve(tiny[0], tiny[1] / "history") as srv:
        yield srv


@pytest.fixture
def page(server):
    with browser_page(server) as p:
        yield p


@contextlib.contextmanager
def browser_page(server):
    """A chromium page on the server's `/`; at the end, no uncaught script error may have happened."""
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
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        if not server.app.state.config.api_key:
            page.wait_for_function("document.querySelector('#model').textContent.includes('tiny')")
        yield page
        assert not errors, errors                       # no uncaught script error in any test
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


# ---------------------------------------------------------------------------------------------- helpers
def shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"page-{name}.jpg"), full_page=True, quality=70)


def no_broken_images(page):
    """Every visible <img> has loaded pixels: no broken-image icon anywhere (once those still loading are done)."""
    visible = "[...document.images].filter((i) => i.offsetParent !== null)"
    page.wait_for_function(f"{visible}.every((i) => i.complete)")
    broken = page.evaluate(f"{visible}.filter((i) => i.naturalWidth === 0).map((i) => i.id || i.alt)")
    assert broken == []


def png_file(tmp_path, name, array) -> Path:
    p = tmp_path / name
    Image.fromarray(array).save(p)
    return p


def random_rgb(seed, h=SIDE, w=SIDE):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def settings(page, prompt, seed, steps=STEPS, side=SIDE):
    page.fill("#prompt", prompt)
    page.fill("#seed", str(seed))
    page.eval_on_selector("#steps", f"el => {{ el.value = {steps}; el.dispatchEvent(new Event('input')); }}")
    if page.is_visible("#width"):                      # image-to-image and inpainting take the input's size
        for sel in ("#width", "#height"):
            page.fill(sel, str(side))
            page.dispatch_event(sel, "change")


def set_range(page, sel, value):
    page.eval_on_selector(sel, f"el => {{ el.value = {value}; el.dispatchEvent(new Event('input')); }}")


def final_image(page) -> np.ndarray:
    page.wait_for_function("document.querySelector('#preview').dataset.kind === 'final' && "
                           "document.querySelector('#cancel').disabled")
    src = page.get_attribute("#preview", "src")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def reference(server, **kw) -> np.ndarray:
    """The Python API's image, computed on the server's worker thread (the one that owns MLX)."""
    worker = server.app.state.worker
    kw = {"height": SIDE, "width": SIDE, "num_inference_steps": STEPS, "loras": {"style": 0.5}, **kw}
    return np.asarray(worker.call(lambda p: p(**kw).images[0], 120))


def choose_mode(page, mode):
    page.click(f"#modes label:has(input[value={mode}])")


def start_with_keyboard(page):
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")


# ---------------------------------------------------------------------------------------------- the modes
def test_text_to_image_progress_preview_final_and_history(page, server, step_delay):
    # Before the first image: a placeholder, no broken-image icon; Turbo's guidance stays folded away.
    assert page.is_hidden("#preview") and page.is_visible("#placeholder")
    no_broken_images(page)
    assert page.evaluate("document.querySelector('#advanced').open") is False
    assert page.input_value("#steps") == "8"
    step_delay(0.2)
    settings(page, "a red fox in the snow", 42, steps=5)
    start_with_keyboard(page)                            # Ctrl+Enter generates
    page.wait_for_function("document.querySelector('#preview').dataset.kind === 'partial'")
    page.wait_for_function("/step [1-5]\\/5 · [0-9.]+ s\\/step/.test(document.querySelector('#status').textContent)")
    assert page.is_visible("#progress")
    page.wait_for_function("+document.querySelector('#preview').dataset.updates >= 3")
    got = final_image(page)
    assert np.array_equal(got, reference(server, prompt="a red fox in the snow", seed=42, num_inference_steps=5))
    assert "done" in page.inner_text("#status") and page.is_hidden("#progress")
    item = page.locator("#gallery .item").first
    params = item.locator(".params").inner_text()
    assert "a red fox in the snow" in params and "seed 42" in params and f"{SIDE}x{SIDE}" in params
    assert item.get_attribute("data-id") in {e["id"] for e in page.request.get(server.url + "/history").json()["data"]}
    page.wait_for_function("document.querySelector('#gallery img').naturalWidth > 0")
    no_broken_images(page)
    shot(page, "text-to-image")


def test_size_presets_and_model_aware_controls(page, server):
    page.select_option("#aspect", "16:9")
    page.select_option("#side", "1024")
    assert (page.input_value("#width"), page.input_value("#height")) == ("1024", "576")
    page.select_option("#aspect", "3:2")
    assert (page.input_value("#width"), page.input_value("#height")) == ("1024", "688")   # 682.7 → multiple of 16
    page.select_option("#aspect", "9:16")
    page.select_option("#side", "512")
    assert (page.input_value("#width"), page.input_value("#height")) == ("288", "512")
    # The negative prompt appears with guidance > 0.
    page.click("#advanced summary")
    assert page.is_hidden("#negative-row")
    set_range(page, "#guidance", 3)
    assert page.is_visible("#negative-row")
    # A Base model (what /info says): guidance shown and on, 50 steps by default.
    info = page.request.get(server.url + "/info").json()
    info.update(variant="base", defaults={**info["defaults"], "num_inference_steps": 50, "guidance_scale": 4.0})
    page.route("**/info", lambda route: route.fulfill(json=info))
    page.reload()
    page.wait_for_function("document.querySelector('#model').textContent.includes('Base')")
    assert page.evaluate("document.querySelector('#advanced').open") is True
    assert page.input_value("#steps") == "50" and page.input_value("#guidance") == "4"
    assert page.is_visible("#negative-row")


def test_image_to_image_upload_drop_and_strength(page, server, tmp_path):
    source = random_rgb(1, 48, 64)
    choose_mode(page, "img2img")
    assert page.is_visible("#input-section") and page.is_hidden("#mask-tools")
    page.set_input_files("#input-file", str(png_file(tmp_path, "photo.png", source)))
    page.wait_for_function("document.querySelector('#input-info').textContent.includes('64×48')")
    # Drag-and-drop replaces it (the same path as a file picked by hand).
    dropped = random_rgb(2, SIDE, SIDE)
    buf = io.BytesIO()
    Image.fromarray(dropped).save(buf, format="PNG")
    page.evaluate("""async (b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
        document.querySelector('#dropzone').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true }));
    }""", base64.b64encode(buf.getvalue()).decode())
    page.wait_for_function("document.querySelector('#input-info').textContent.includes('dropped.png')")
    settings(page, "an oil painting", 7, steps=4)
    set_range(page, "#strength", 0.5)
    page.click("#generate")
    got = final_image(page)
    want = reference(server, prompt="an oil painting", seed=7, num_inference_steps=4, strength=0.5,
                     image=Image.fromarray(dropped))
    assert np.array_equal(got, want)
    assert "image-to-image" in page.locator("#gallery .item .params").first.inner_text()
    shot(page, "image-to-image")


def _mask_alpha(page) -> np.ndarray:
    b64 = page.evaluate("""async () => {
        const [, blob] = await maskBlob();
        const bytes = new Uint8Array(await blob.arrayBuffer());
        let s = ""; for (const b of bytes) s += String.fromCharCode(b);
        return btoa(s);
    }""")
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.mode == "RGBA" and img.size == (SIDE, SIDE)
    return np.asarray(img)[..., 3]


def _drag(page, box, a, b):
    page.mouse.move(box["x"] + a[0] * box["width"], box["y"] + a[1] * box["height"])
    page.mouse.down()
    for t in np.linspace(0, 1, 8):
        page.mouse.move(box["x"] + (a[0] + t * (b[0] - a[0])) * box["width"],
                        box["y"] + (a[1] + t * (b[1] - a[1])) * box["height"])
    page.mouse.up()


def test_inpaint_brush_paints_the_expected_mask_and_the_edit_matches(page, server, tmp_path):
    source = random_rgb(3)
    choose_mode(page, "inpaint")
    page.set_input_files("#input-file", str(png_file(tmp_path, "photo.png", source)))
    page.wait_for_selector("#canvas-stack:not([hidden])")
    set_range(page, "#brush-size", 100)
    box = page.locator("#mask-canvas").bounding_box()
    _drag(page, box, (0.25, 0.5), (0.75, 0.5))
    # The stroke: every pixel within the brush radius of the segment is marked for editing (alpha 0), none beyond.
    radius = 100 * SIDE / box["width"] / 2
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] + 0.5
    x0, x1 = 0.25 * SIDE, 0.75 * SIDE
    dist = np.hypot(xx - np.clip(xx, x0, x1), yy - 0.5 * SIDE)
    alpha = _mask_alpha(page)
    assert (alpha[dist < radius - 1.5] == 0).all() and (alpha[dist > radius + 1.5] == 255).all()
    assert set(np.unique(alpha)) == {0, 255}
    # The eraser takes paint away; invert flips every pixel; clear empties it.
    page.check("#eraser")
    set_range(page, "#brush-size", 20)
    _drag(page, box, (0.5, 0.5), (0.5, 0.5))
    erased = _mask_alpha(page)
    assert erased[32, 32] == 255 and erased[32, 20] == 0
    page.click("#mask-invert")
    assert np.array_equal(_mask_alpha(page), 255 - erased)
    page.click("#mask-invert")
    page.click("#mask-clear")
    assert (_mask_alpha(page) == 255).all()
    page.uncheck("#eraser")
    set_range(page, "#brush-size", 100)
    _drag(page, box, (0.25, 0.5), (0.75, 0.5))
    mask = _mask_alpha(page)
    settings(page, "a golden sun", 11)
    page.click("#generate")
    got = final_image(page)
    rgba = np.dstack([np.zeros((SIDE, SIDE, 3), np.uint8), mask])
    want = reference(server, prompt="a golden sun", seed=11, image=Image.fromarray(source),
                     mask_image=openai_mask(Image.fromarray(rgba, "RGBA")), strength=1.0)
    assert np.array_equal(got, want)
    shot(page, "inpaint")


def test_controlnet_with_a_lora_weight(page, server, tmp_path):
    control = random_rgb(4)
    choose_mode(page, "control")
    assert page.is_visible("#control-section") and page.is_hidden("#input-section")
    assert page.locator("#loras input[data-lora=style]").input_value() == "0.5"
    page.set_input_files("#control-file", str(png_file(tmp_path, "pose.png", control)))
    page.wait_for_selector("#control-thumb:not([hidden])")
    page.select_option("#control-type", "canny")
    set_range(page, "#control-scale", 0.6)
    set_range(page, "#loras input[data-lora=style]", 0.8)
    settings(page, "a dancer", 5)
    page.click("#generate")
    got = final_image(page)
    want = reference(server, prompt="a dancer", seed=5, control_image=Image.fromarray(control), control_type="canny",
                     controlnet_conditioning_scale=0.6, loras={"style": 0.8})
    assert np.array_equal(got, want)
    params = page.locator("#gallery .item .params").first.inner_text()
    assert "control canny × 0.6" in params and "LoRA style 0.8" in params
    shot(page, "controlnet")


def test_history_survives_a_reload_reuse_use_as_input_delete(page, server):
    settings(page, "a lighthouse at dusk", 100)
    page.fill("#n", "2")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('2/2 done')")
    ids = page.eval_on_selector_all("#gallery .item", "els => els.map((e) => e.dataset.id)")
    assert len(ids) >= 2 and all(ids)
    page.reload()
    page.wait_for_function(f"document.querySelectorAll('#gallery .item').length === {len(ids)}")
    assert page.eval_on_selector_all("#gallery .item", "els => els.map((e) => e.dataset.id)") == ids
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].every((i) => i.naturalWidth > 0)")
    no_broken_images(page)
    # The newest two are the lighthouse's seeds 101 and 100 (image k has seed + k).
    first = page.locator("#gallery .item").first
    assert "seed 101" in first.locator(".params").inner_text()
    page.fill("#prompt", "something else")
    page.locator("#gallery .item").nth(1).locator("button.reuse").click()
    assert page.input_value("#prompt") == "a lighthouse at dusk" and page.input_value("#seed") == "100"
    assert (page.input_value("#width"), page.input_value("#height"), page.input_value("#steps")) == \
        (str(SIDE), str(SIDE), str(STEPS))
    first.locator("button.use-input").click()
    page.wait_for_function("document.querySelector('#input-info').textContent.includes('64×64')")
    assert page.is_checked("input[value=img2img]")
    shot(page, "history")
    # Deleting removes the entry, its files, and it stays gone after a reload.
    gone = ids[0]
    first.locator("button.delete").click()
    page.wait_for_function(f"!document.querySelector('[data-id=\"{gone}\"]')")
    assert not list(server.history_dir.glob(f"{gone}.*"))
    page.reload()
    page.wait_for_function(f"document.querySelectorAll('#gallery .item').length === {len(ids) - 1}")
    assert gone not in page.eval_on_selector_all("#gallery .item", "els => els.map((e) => e.dataset.id)")


def test_live_mode_only_the_last_prompt_finishes(page, server, step_delay):
    step_delay(0.3)
    set_range(page, "#steps", 4)
    page.select_option("#aspect", "16:9")
    page.select_option("#side", "512")
    health = lambda: page.request.get(server.url + "/health").json()   # noqa: E731
    before, items = health(), page.locator("#gallery .item").count()
    page.check("#live")
    page.fill("#prompt", "a cat")
    # The first live job is running (its previews show), then the prompt changes before it can finish.
    page.wait_for_function("document.querySelector('#preview').dataset.prompt === 'a cat'")
    assert page.get_attribute("#preview", "data-kind") == "partial"
    page.fill("#prompt", "a dog on a beach")
    page.wait_for_function("document.querySelector('#preview').dataset.kind === 'final' && "
                           "document.querySelector('#preview').dataset.prompt === 'a dog on a beach'")
    wait_for(lambda: not health()["queue"], 10)
    after = health()
    assert after["completed"] - before["completed"] == 1     # only the second prompt's image finished
    assert after["cancelled"] - before["cancelled"] == 1     # the first was cancelled mid-generation
    assert page.locator("#gallery .item").count() == items   # live results stay out of the gallery and history
    # Live renders are small: the 512x288 settings run at 256x144 ...
    assert page.evaluate("[document.querySelector('#preview').naturalWidth, "
                         "document.querySelector('#preview').naturalHeight]") == [256, 144]
    # ... and "Render full size" renders them at 512x288 into the gallery.
    page.click("#render")
    page.wait_for_function(f"document.querySelectorAll('#gallery .item').length === {items + 1}")
    page.wait_for_function("document.querySelector('#gallery img').naturalWidth > 0")
    assert page.evaluate("[document.querySelector('#gallery img').naturalWidth, "
                         "document.querySelector('#gallery img').naturalHeight]") == [512, 288]
    live_seed = page.evaluate("liveSeed")
    assert f"seed {live_seed}" in page.inner_text("#gallery .item .params")   # the same picture, larger


# ---------------------------------------------------------------------------------------------- bad input
def _status_error(page, text):
    page.wait_for_function(f"document.querySelector('#status').className === 'error' && "
                           f"document.querySelector('#status').textContent.includes({json.dumps(text)})")


def test_bad_inputs_get_one_message_and_the_server_goes_on(page, server, tmp_path):
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    choose_mode(page, "inpaint")
    settings(page, "a boat", 3)
    page.click("#generate")                                   # a mask needs an image to paint on
    _status_error(page, "choose an image to paint the mask on first")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    page.set_input_files("#input-file", str(notes))
    _status_error(page, "'notes.txt' is not an image")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG but not really")
    page.set_input_files("#input-file", str(fake))
    _status_error(page, "'fake.png' is not an image this browser can read")
    # A 100-MB file is refused before anything is sent (the server's limit comes from /info) ...
    page.evaluate("""() => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(100 * 2 ** 20)], "huge.png", { type: "image/png" }));
        document.querySelector('#dropzone').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true }));
    }""")
    _status_error(page, "'huge.png' is 100.0 MB: the server takes at most 8.0 MB per request")
    assert posts == []
    # ... and the server answers 413 to a client that sends one anyway.
    r = page.request.post(server.url + "/v1/images/edits", multipart={
        "prompt": "x", "image": {"name": "big.png", "mimeType": "image/png", "buffer": b"\0" * (MAX_BODY + 1)}})
    assert r.status == 413 and "request body over" in r.json()["error"]["message"]
    # An image but nothing painted.
    page.set_input_files("#input-file", str(png_file(tmp_path, "ok.png", random_rgb(6))))
    page.wait_for_selector("#canvas-stack:not([hidden])")
    page.click("#generate")
    _status_error(page, "paint the area to repaint")
    # A LoRA the server does not have: a stale page's slider is answered in the API's words ...
    choose_mode(page, "txt2img")
    page.eval_on_selector("#loras input[data-lora=style]", "el => { el.dataset.lora = 'gone'; }")
    page.click("#generate")
    _status_error(page, "'gone'")
    message = page.inner_text("#status")
    body = {"prompt": "a boat", "size": "64x64", "loras": {"gone": 0.5}}
    assert page.request.post(server.url + "/v1/images/generations", data=body).json()["error"]["message"] == message
    # ... and reused settings naming one leave it out with a note.
    page.eval_on_selector("#loras input[data-lora=gone]", "el => { el.dataset.lora = 'style'; }")
    page.evaluate("reuse({prompt: 'a boat', seed: 3, num_inference_steps: 3, size: '64x64', loras: {gone: 0.5}})")
    _status_error(page, "this server has no LoRA 'gone': left out")
    shot(page, "errors")
    # The server goes on: the next generation works.
    page.click("#generate")
    assert final_image(page).shape == (SIDE, SIDE, 3)
    no_broken_images(page)


def test_guidance_negative_cache_and_enhance_reach_the_api(page, server):
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/generations") else None)
    page.click("#advanced summary")
    set_range(page, "#guidance", 2)
    page.fill("#negative", "blurry")
    page.select_option("#cache", "teacache")
    page.fill("#cache-threshold", "0")                 # threshold 0 computes every step: the uncached image
    page.check("#enhance")
    settings(page, "a fox", 9)
    page.click("#generate")
    got = final_image(page)
    body = sent[-1]
    assert (body["guidance_scale"], body["negative_prompt"], body["cache"], body["cache_threshold"],
            body["enhance_prompt"]) == (2, "blurry", "teacache", 0, True)
    revised = page.text_content("#revised").removeprefix("Enhanced prompt: ")
    assert revised and page.is_visible("#revised")
    want = reference(server, prompt=revised, negative_prompt="blurry", guidance_scale=2.0, seed=9)
    assert np.array_equal(got, want)
    assert f"enhanced: {revised}" in page.locator("#gallery .item .params").first.text_content()


def test_a_server_with_an_api_key(tiny):
    """The page asks for the key, then everything (info, generation, history images) goes through with it."""
    with _serve(tiny[0], tiny[1] / "history-key", api_key="sekret") as srv:
        with browser_page(srv) as p:
            _status_error(p, "enter the API key")
            assert p.is_visible("#keyrow")
            p.fill("#apikey", "sekret")
            p.dispatch_event("#apikey", "change")
            p.wait_for_function("document.querySelector('#model').textContent.includes('tiny')")
            settings(p, "a key", 1)
            p.click("#generate")
            final_image(p)
            p.reload()                                     # the key is remembered; history images load with it
            p.wait_for_function("document.querySelectorAll('#gallery img').length === 1 && "
                                "document.querySelector('#gallery img').naturalWidth > 0")
            assert p.get_attribute("#gallery img", "src").startswith("blob:")
            assert p.request.get(srv.url + "/history").status == 401      # not without the key


def test_a_server_without_history_keeps_this_pages_images_only(tiny):
    with _serve(tiny[0], None) as srv:
        with browser_page(srv) as p:
            assert "keeps none" in p.inner_text("#history-note")
            settings(p, "a kite", 2)
            p.click("#generate")
            got = final_image(p)
            item = p.locator("#gallery .item")
            assert item.count() == 1 and item.get_attribute("data-id") is None
            assert item.locator("button.delete").count() == 0            # nothing on the server to delete
            p.wait_for_function("document.querySelector('#gallery img').naturalWidth > 0")
            shown = p.evaluate("""async () => {
                const b = await (await fetch(document.querySelector('#gallery a[download]').href)).arrayBuffer();
                let s = ""; for (const x of new Uint8Array(b)) s += String.fromCharCode(x); return btoa(s);
            }""")
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(shown))).convert("RGB")), got)
            p.reload()
            p.wait_for_function("document.querySelector('#history-note').textContent.includes('keeps none')")
            assert p.locator("#gallery .item").count() == 0
