"""The OpenAI-compatible server on a tiny random checkpoint: responses, pixel equality with the Python API, edits,
streaming, bad inputs, failures, queueing, disconnects and memory. Loopback only; every wait is bounded."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from live_server import LiveServer, wait_for
from make_pipeline import save_tiny_pipeline

from zimage_mlx import ZImagePipeline, sampler
from zimage_mlx.apps.pngfile import png_params, read_png_params
from zimage_mlx.apps.jobs import partial_steps as _partial_steps
from zimage_mlx.apps.server import ServerConfig, create_app

H = W = 64
STEPS = 3


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, qwen_tokenizer_dir):
    root, _ = save_tiny_pipeline(tmp_path_factory.mktemp("zimage") / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    return ZImagePipeline.from_pretrained(root, dtype="float32", quantize=None, keep_text_encoder=True)


def _config(**kw):
    return ServerConfig(**{"default_size": H, "model": "tiny", **kw})


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, _config()), raise_server_exceptions=False) as c:
        yield c


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _reference(client, **kw) -> np.ndarray:
    """The Python API's image, computed on the server's worker thread (the one that owns MLX)."""
    img = client.app.state.worker.call(lambda p: p(height=H, width=W, num_inference_steps=STEPS, **kw).images[0], 60)
    return np.asarray(img)


def _gen(client, **body):
    return client.post("/v1/images/generations", json={"size": f"{W}x{H}", "num_inference_steps": STEPS, **body})


# ---------------------------------------------------------------------------------------------- responses
def test_b64_images_equal_the_python_api_and_carry_metadata(client):
    r = _gen(client, prompt="a red fox", n=2, seed=7)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"created", "data", "size", "output_format"} and body["size"] == f"{W}x{H}"
    assert [d["seed"] for d in body["data"]] == [7, 8]
    for k, item in enumerate(body["data"]):
        img = _png(item["b64_json"])
        assert img.format == "PNG" and img.size == (W, H)
        assert np.array_equal(np.asarray(img.convert("RGB")), _reference(client, prompt="a red fox", seed=7 + k))
    # The CLI's PNG metadata: same chunks, same values.
    raw = base64.b64decode(body["data"][1]["b64_json"])
    path = client.app.state.files.dir.parent / f"zimage-test-{os.getpid()}.png"
    path.write_bytes(raw)
    try:
        meta = read_png_params(path)
    finally:
        path.unlink()
    pipe = client.app.state.worker.pipe
    expected = png_params("a red fox", None, 8, STEPS, 0.0, f"{W}x{H}", "tiny", pipe.quantization, pipe.dtype_name)
    assert meta == {k: v for k, v in expected.items() if k in meta} and meta["seed"] == "8" and meta["prompt"] == "a red fox"


def test_url_response_serves_the_same_image_then_expires(client):
    b64 = _gen(client, prompt="a lighthouse", seed=3).json()["data"][0]["b64_json"]
    r = _gen(client, prompt="a lighthouse", seed=3, response_format="url")
    url = r.json()["data"][0]["url"]
    assert url.startswith("http://testserver/files/") and "b64_json" not in r.json()["data"][0]
    got = client.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(got.content))), np.asarray(_png(b64)))
    name = url.rsplit("/", 1)[1]
    old = time.time() - client.app.state.config.url_ttl - 5
    os.utime(client.app.state.files.dir / name, (old, old))
    gone = client.get(url)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    assert client.get("/files/..%2Fetc%2Fpasswd").status_code == 404


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_other_output_formats(client, fmt, pil):
    r = _gen(client, prompt="a cat", seed=1, output_format=fmt, output_compression=80)
    assert r.status_code == 200 and r.json()["output_format"] == fmt
    assert _png(r.json()["data"][0]["b64_json"]).format == pil


def test_models_and_health(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["queue"] == 0 and h["auth"] is False


def test_web_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="prompt"' in r.text
    # Every script and style sheet the page names is served; together they stay under 60 KB (no build step).
    names = re.findall(r'(?:src|href)="/static/([^"]+)"', r.text)
    assert {"page.js", "page.css"} <= set(names)
    total = len(r.content)
    for name in names:
        f = client.get(f"/static/{name}")
        assert f.status_code == 200 and f.headers["content-type"].startswith(("text/javascript", "text/css"))
        total += len(f.content)
    assert "/v1/images/generations" in client.get("/static/page.js").text
    assert total <= 60 * 1024, total
    r = client.get("/static/../server.py")
    assert r.status_code == 404
    assert client.get("/static/nope.js").json()["error"]["message"] == "no such page file 'nope.js'"


# ---------------------------------------------------------------------------------------------- edits
def _upload(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_edits_equal_the_python_api_img2img(client):
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (H + 5, W + 3, 3), dtype=np.uint8))   # floored to 64x64
    r = client.post("/v1/images/edits", files={"image": ("in.png", _upload(src), "image/png")},
                    data={"prompt": "the same, at night", "seed": "4", "strength": "0.7",
                          "num_inference_steps": str(STEPS)})
    assert r.status_code == 200, r.text
    out = _png(r.json()["data"][0]["b64_json"])
    assert out.size == (W, H)
    ref = _reference(client, prompt="the same, at night", image=src, strength=0.7, seed=4)
    assert np.array_equal(np.asarray(out.convert("RGB")), ref)
    # Resized by `size`, and the array form of the SDK (`image[]`).
    r = client.post("/v1/images/edits", files={"image[]": ("in.png", _upload(src), "image/png")},
                    data={"prompt": "x", "size": "32x48", "num_inference_steps": "2"})
    assert r.status_code == 200 and _png(r.json()["data"][0]["b64_json"]).size == (32, 48)


def test_edits_with_an_openai_mask_inpaint(client):
    """OpenAI's masks mark the area to edit as transparent; the pipeline gets it as white = repaint."""
    rng = np.random.default_rng(1)
    src = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    alpha = np.full((H, W), 255, np.uint8)
    alpha[16:48, 8:40] = 0                                              # the hole to repaint
    mask = Image.fromarray(np.dstack([np.zeros((H, W, 3), np.uint8), alpha]), "RGBA")
    r = client.post("/v1/images/edits", files={"image": ("in.png", _upload(src), "image/png"),
                                               "mask": ("m.png", _upload(mask), "image/png")},
                    data={"prompt": "a window", "seed": "5", "num_inference_steps": str(STEPS)})
    assert r.status_code == 200, r.text
    out = np.asarray(_png(r.json()["data"][0]["b64_json"]).convert("RGB"))
    white = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))
    assert np.array_equal(out, _reference(client, prompt="a window", image=src, mask_image=white, seed=5))


def test_edits_bad_inputs(client):
    ok = _upload(Image.new("RGB", (64, 64), "red"))
    cases = [
        ({"files": {"note": ("n.txt", b"hi", "text/plain")}, "data": {"prompt": "x"}}, 400, "image"),   # no image
        ({"files": {"image": ("a.png", b"not an image", "image/png")}, "data": {"prompt": "x"}}, 400, "image"),
        ({"files": {"image": ("a.png", ok, "image/png")}, "data": {}}, 400, "prompt"),
        ({"files": {"image": ("a.png", ok, "image/png"),
                    "mask": ("m.png", _upload(Image.new("RGBA", (32, 64))), "image/png")},
          "data": {"prompt": "x"}}, 400, "mask"),                                            # not the image's size
        ({"files": {"image": ("a.png", _upload(Image.new("RGB", (8, 8))), "image/png")}, "data": {"prompt": "x"}},
         400, "image"),                                                      # under 16x16 and no 'size' given
    ]
    for kw, status, param in cases:
        r = client.post("/v1/images/edits", **kw)
        assert r.status_code == status and r.json()["error"]["param"] == param, (kw.get("data"), r.text)
    r = client.post("/v1/images/edits", json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"


# ---------------------------------------------------------------------------------------------- streaming
def _events(lines) -> list[dict]:
    out, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            ev = json.loads(line[6:])
            assert ev["type"] == name
            out.append(ev)
    return out


def test_streaming_partial_then_completed(client):
    body = {"prompt": "a red fox", "seed": 2, "size": f"{W}x{H}", "num_inference_steps": 6, "stream": True,
            "partial_images": 2}
    with client.stream("POST", "/v1/images/generations", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.iter_lines())
    assert [e["type"] for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e["partial_image_index"] for e in events[:2]] == [0, 1]
    # Each partial says which step it shows, of how many (6 steps, 2 partials: after steps 2 and 4).
    assert [(e["step"], e["num_steps"]) for e in events[:2]] == [(2, 6), (4, 6)]
    partials = [_png(e["b64_json"]) for e in events[:2]]
    assert all(p.size == (W // 8, H // 8) for p in partials)
    assert not np.array_equal(np.asarray(partials[0]), np.asarray(partials[1]))   # the picture moves
    final = np.asarray(_png(events[-1]["b64_json"]).convert("RGB"))
    ref = client.app.state.worker.call(
        lambda p: p(prompt="a red fox", height=H, width=W, num_inference_steps=6, seed=2).images[0], 60)
    assert np.array_equal(final, np.asarray(ref)) and events[-1]["seed"] == 2


def test_partial_steps_are_spread_and_never_last():
    assert _partial_steps(8, 3) == {1, 3, 5}
    assert _partial_steps(8, 1) == {3}
    assert _partial_steps(4, 50) == {0, 1, 2}
    assert _partial_steps(1, 3) == set() and _partial_steps(8, 0) == set()


# ---------------------------------------------------------------------------------------------- bad inputs
BAD = [
    ({}, "prompt", "missing_required_parameter"),
    ({"prompt": ""}, "prompt", "invalid_value"),
    ({"prompt": 5}, "prompt", "invalid_type"),
    ({"prompt": "x", "size": "100x64"}, "size", "invalid_value"),
    ({"prompt": "x", "size": "0x64"}, "size", "invalid_value"),
    ({"prompt": "x", "size": "65536x65536"}, "size", "invalid_value"),
    ({"prompt": "x", "size": "4096x4096"}, "size", "invalid_value"),          # over max_pixels
    ({"prompt": "x", "size": "big"}, "size", "invalid_value"),
    ({"prompt": "x", "size": 64}, "size", "invalid_value"),
    ({"prompt": "x", "n": 0}, "n", "invalid_value"),
    ({"prompt": "x", "n": 11}, "n", "invalid_value"),
    ({"prompt": "x", "n": "2"}, "n", "invalid_type"),
    ({"prompt": "x", "n": 1.5}, "n", "invalid_type"),
    ({"prompt": "x", "n": True}, "n", "invalid_type"),
    ({"prompt": "x", "response_format": "xml"}, "response_format", "invalid_value"),
    ({"prompt": "x", "output_format": "gif"}, "output_format", "invalid_value"),
    ({"prompt": "x", "stream": "yes"}, "stream", "invalid_type"),
    ({"prompt": "x", "partial_images": -1}, "partial_images", "invalid_value"),
    ({"prompt": "x", "seed": -1}, "seed", "invalid_value"),
    ({"prompt": "x", "seed": "1"}, "seed", "invalid_type"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "invalid_value"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale", "invalid_type"),
    ({"prompt": "x", "negative_prompt": ["a"]}, "negative_prompt", "invalid_type"),
    ({"prompt": "x", "loras": {"style": 0.8}}, "loras", "invalid_value"),     # no adapter loaded
    ({"prompt": "x", "loras": "style"}, "loras", None),
]


@pytest.mark.parametrize("body,param,code", BAD, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD)])
def test_bad_generation_inputs(client, body, param, code):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code and err["type"] == "invalid_request_error"
    assert err["message"] and "Traceback" not in r.text
    assert client.get("/health").json()["status"] == "ok"


def test_malformed_requests(client):
    for content in (b"{not json", b"\xff\xfe", b"[1, 2]", b'"a prompt"'):
        r = client.post("/v1/images/generations", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", content
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = client.get("/v1/images/generations")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert _gen(client, prompt="still serving", seed=0).status_code == 200


def test_api_key_and_body_limit(pipe):
    with TestClient(create_app(pipe, _config(api_key="sekrit", max_body=2000)), raise_server_exceptions=False) as c:
        body = {"prompt": "x", "size": "32x32", "num_inference_steps": 1}
        r = c.post("/v1/images/generations", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = c.post("/v1/images/generations", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        assert c.get("/health").json()["auth"] is True      # open, so the page knows to ask for a key
        ok = {"Authorization": "Bearer sekrit"}
        assert c.post("/v1/images/generations", json=body, headers=ok).status_code == 200
        r = c.post("/v1/images/generations", json={**body, "prompt": "x" * 5000}, headers=ok)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert c.post("/v1/images/generations", json=body, headers=ok).status_code == 200


def test_a_failing_generation_answers_500_and_the_server_goes_on(client, monkeypatch):
    pipe = client.app.state.worker.pipe
    real = pipe.decode_latents

    def oom(latents):
        monkeypatch.setattr(pipe, "decode_latents", real)   # fail once
        raise RuntimeError("[metal::malloc] Resource limit (499000) exceeded")

    monkeypatch.setattr(pipe, "decode_latents", oom)
    r = _gen(client, prompt="x", seed=0)
    assert r.status_code == 500 and r.json()["error"]["code"] == "out_of_memory" and "Traceback" not in r.text
    assert _gen(client, prompt="x", seed=0).status_code == 200
    assert client.get("/health").json()["failed"] >= 1


# ---------------------------------------------------------------------------------------------- real sockets
@pytest.fixture
def slow_steps(monkeypatch):
    """Each denoising step takes at least 50 ms, so a request is reliably still running when the test acts."""
    real = sampler.euler_step

    def slow(*a, **kw):
        time.sleep(0.05)
        return real(*a, **kw)

    monkeypatch.setattr(sampler, "euler_step", slow)


def test_concurrent_clients_complete_or_get_429(pipe):
    app = create_app(pipe, _config(max_queue=4))
    worker, gate = app.state.worker, threading.Event()
    results, lock = [], threading.Lock()
    with LiveServer(app) as srv:
        blocker = threading.Thread(target=worker.call, args=(lambda p: gate.wait(30), 60))
        blocker.start()                               # holds 1 of the 4 slots until released
        wait_for(lambda: worker.running)

        def client(i):
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                for j in range(2):
                    r = c.post("/v1/images/generations", json={"prompt": f"client {i}", "seed": 100 * i + j,
                                                               "size": "32x32", "num_inference_steps": 2})
                    with lock:
                        results.append((i, j, r.status_code, r.json()))
                    if j == 0:
                        wait_for(gate.is_set, 30)   # second round once the worker runs again

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        wait_for(lambda: len(results) >= 3)            # 3 slots left: the other 3 first requests get 429 at once
        assert sorted(r[2] for r in results) == [429, 429, 429]
        gate.set()
        for t in threads:
            t.join(60)
        blocker.join(10)
        stats = httpx.get(f"{srv.url}/health").json()
    assert len(results) == 12 and all(s in (200, 429) for _, _, s, _ in results)
    done = [(i, j, b) for i, j, s, b in results if s == 200]
    assert stats["queue"] == 0 and stats["completed"] == len(done) >= 3
    for i, j, b in done:                               # nothing lost or mixed up: each answer is its own request
        assert b["data"][0]["seed"] == 100 * i + j and _png(b["data"][0]["b64_json"]).size == (32, 32)
    assert all(b["error"]["code"] == "queue_full" for _, _, s, b in results if s == 429)


def test_all_complete_when_the_queue_is_large_enough(pipe):
    app = create_app(pipe, _config(max_queue=16))
    results = []
    with LiveServer(app) as srv:
        def client(i):
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                for j in range(2):
                    r = c.post("/v1/images/generations", json={"prompt": f"c{i}", "seed": 10 * i + j, "size": "32x32",
                                                               "num_inference_steps": 2})
                    results.append((i, j, r.status_code, r.json()["data"][0]["seed"] if r.status_code == 200 else None))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(results) == sorted((i, j, 200, 10 * i + j) for i in range(6) for j in range(2))


def test_disconnect_cancels_the_job_and_frees_the_queue(pipe, slow_steps):
    app = create_app(pipe, _config(max_queue=1))
    worker = app.state.worker
    with LiveServer(app) as srv:
        # Streaming: read one partial image, then hang up.
        body = {"prompt": "long", "seed": 0, "size": "32x32", "num_inference_steps": 60, "stream": True,
                "partial_images": 50}
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with c.stream("POST", "/v1/images/generations", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break
        wait_for(lambda: worker.stats["cancelled"] == 1 and worker.active == 0, timeout=10)
        # Non-streaming: the client gives up (timeout) mid-generation.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/images/generations", timeout=0.5,
                       json={**body, "stream": False, "partial_images": 0})
        wait_for(lambda: worker.stats["cancelled"] == 2 and worker.active == 0, timeout=10)
        # The single slot is free again.
        r = httpx.post(f"{srv.url}/v1/images/generations", timeout=30,
                       json={"prompt": "next", "size": "32x32", "num_inference_steps": 2})
        assert r.status_code == 200
    assert worker.stats["completed"] == 1


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_stays_flat_over_30_requests(client):
    for i in range(5):   # warm up caches and allocator pools
        _gen(client, prompt="warm", seed=i, response_format="url" if i % 2 else "b64_json")
    worker = client.app.state.worker
    mlx0, rss0 = worker.stats["active_memory_mb"], _rss_mb()
    for i in range(30):
        r = _gen(client, prompt=f"request {i}", seed=i, response_format="url" if i % 2 else "b64_json")
        assert r.status_code == 200
    mlx1, rss1 = worker.stats["active_memory_mb"], _rss_mb()
    print(f"MLX active {mlx0:.1f} -> {mlx1:.1f} MB, RSS {rss0:.1f} -> {rss1:.1f} MB")
    assert abs(mlx1 - mlx0) < 0.5
    assert rss1 - rss0 < 20


# ---------------------------------------------------------------------------------------------- the CLI command
def test_serve_command_builds_a_working_app(pipe, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from zimage_mlx.apps import serve_cmd
    from zimage_mlx.apps.cli import cli

    started = {}
    monkeypatch.setenv("ZIMAGE_MLX_STATE", str(tmp_path / "state"))   # the history's default folder

    def fake_serve(app, sock, verbose):   # the socket is bound; drive the app the command built in-process
        started.update(address=sock.getsockname()[:2])
        with TestClient(app) as c:
            started["health"] = c.get("/health").json()
            started["denied"] = c.post("/v1/images/generations", json={"prompt": "x"}).status_code
            r = c.post("/v1/images/generations", headers={"Authorization": "Bearer k1"},
                       json={"prompt": "a fox", "size": "32x32", "num_inference_steps": 2, "seed": 9})
            started["image"] = _png(r.json()["data"][0]["b64_json"])

    monkeypatch.setattr(serve_cmd, "serve_forever", fake_serve)
    r = CliRunner().invoke(cli, ["serve", "--model", pipe.source, "--quantize", "none", "--dtype", "float32",
                                 "--port", "0", "--api-key", "k1", "--max-queue", "3"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    host, port = started["address"]
    assert host == "127.0.0.1" and port > 0                                      # localhost unless told otherwise
    assert started["health"]["max_queue"] == 3 and started["health"]["auth"] is True
    assert started["health"]["model"] == "Z-Image-Turbo-tiny" and started["denied"] == 401
    assert started["image"].size == (32, 32)
    meta = started["image"].text
    assert meta["seed"] == "9" and meta["model"] == "Z-Image-Turbo-tiny" and meta["prompt"] == "a fox"
    assert f"serving on http://127.0.0.1:{port}/" in r.output

    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    r = CliRunner().invoke(cli, ["serve", "--model", pipe.source, "--port", "0", "--lora", f"{lora}:0.5"])
    assert r.exit_code == 1 and "style.safetensors" in r.output.strip().splitlines()[-1], r.output   # no LoRA
    r = CliRunner().invoke(cli, ["serve", "--model", pipe.source, "--lora", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 2 and "no such file" in r.output


def test_serve_on_a_port_in_use_is_one_line_and_exit_1(pipe, monkeypatch):
    """The port is bound before anything is printed or loaded: no "serving on", no uvicorn error, exit 1."""
    import socket

    from click.testing import CliRunner

    from zimage_mlx.apps.cli import cli

    loads = []
    monkeypatch.setattr(ZImagePipeline, "from_pretrained", classmethod(lambda cls, *a, **kw: loads.append(a)))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = CliRunner().invoke(cli, ["serve", "--model", pipe.source, "--port", str(port)])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and not loads, r.output
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0] and "in use" in lines[0] and "serving" not in r.output


# ---------------------------------------------------------------------------------------------- the official SDK
def test_openai_sdk_client(pipe):
    import openai

    app = create_app(pipe, _config(api_key="k", max_queue=1))
    worker, gate = app.state.worker, threading.Event()
    with LiveServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0, timeout=60)
        r = client.images.generate(model="tiny", prompt="a fox", size="32x32", n=2,
                                   extra_body={"seed": 3, "num_inference_steps": 2})
        assert r.size == "32x32" and len(r.data) == 2
        ref = worker.call(lambda p: p(prompt="a fox", height=32, width=32, num_inference_steps=2, seed=4).images[0], 60)
        assert np.array_equal(np.asarray(_png(r.data[1].b64_json).convert("RGB")), np.asarray(ref))

        events = list(client.images.generate(model="tiny", prompt="a fox", size="32x32", stream=True,
                                             partial_images=2, extra_body={"num_inference_steps": 4}))
        assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]

        edit = client.images.edit(image=("in.png", _upload(Image.new("RGB", (48, 32), "teal")), "image/png"),
                                  prompt="at night", extra_body={"num_inference_steps": 2, "strength": 0.5})
        assert _png(edit.data[0].b64_json).size == (48, 32)
        assert [m.id for m in client.models.list()] == ["tiny"]

        with pytest.raises(openai.BadRequestError, match="multiple of 16"):
            client.images.generate(model="tiny", prompt="a fox", size="33x32")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
        blocker = threading.Thread(target=worker.call, args=(lambda p: gate.wait(30), 60))
        blocker.start()
        wait_for(lambda: worker.running)
        try:
            with pytest.raises(openai.RateLimitError, match="queue is full"):
                client.images.generate(model="tiny", prompt="a fox", size="32x32")
        finally:
            gate.set()
            blocker.join(30)
