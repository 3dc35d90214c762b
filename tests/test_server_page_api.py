"""What the web page needs from the server: /info, the on-disk image history (/history) and ControlNet over the API
(multipart generations with a control_image), on tiny random checkpoints; images compared pixel for pixel with the
Python API."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from make_controlnet import make_tiny_controlnet, save_tiny_controlnet
from make_lora import as_peft, random_lora, save
from make_pipeline import save_tiny_pipeline

from zimage_mlx import ZImagePipeline
from zimage_mlx.apps.history import History
from zimage_mlx.apps.server import ServerConfig, create_app

S = 32          # image side
STEPS = 2
KEYS = {"id", "created", "prompt", "negative_prompt", "size", "num_inference_steps", "guidance_scale", "seed",
        "strength", "loras", "cache", "cache_threshold", "mode", "control_type", "controlnet_conditioning_scale",
        "enhance_prompt", "revised_prompt", "output_format", "model"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen_tokenizer_dir):
    """(checkpoint root, ControlNet dir, LoRA file) of one tiny model."""
    tmp = tmp_path_factory.mktemp("page-api")
    root, models = save_tiny_pipeline(tmp / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    cn = save_tiny_controlnet(tmp / "controlnet", make_tiny_controlnet(5, "2.1"))
    lora = save(tmp / "style.safetensors", as_peft(random_lora(models["transformer"], strength=0.2, seed=3)))
    return root, cn, lora


@pytest.fixture(scope="module")
def pipe(tiny):
    return ZImagePipeline.from_pretrained(tiny[0], dtype="float32", quantize=None, keep_text_encoder=True)


@pytest.fixture(scope="module")
def cn_pipe(tiny):
    root, cn, lora = tiny
    p = ZImagePipeline.from_pretrained(root, dtype="float32", quantize=None, keep_text_encoder=True, controlnet=cn)
    p.load_lora_weights(lora, adapter_name="style")
    p.set_adapters(["style"], [0.5])
    return p


def _config(**kw):
    return ServerConfig(**{"default_size": S, "model": "tiny", **kw})


@pytest.fixture(scope="module")
def client(pipe, tmp_path_factory):
    """The plain pipeline with a history of at most 6 images."""
    cfg = _config(history_dir=tmp_path_factory.mktemp("history"), history_items=6)
    with TestClient(create_app(pipe, cfg), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def cn_client(cn_pipe, tmp_path_factory):
    cfg = _config(loras={"style": 0.5}, history_dir=tmp_path_factory.mktemp("cn-history"))
    with TestClient(create_app(cn_pipe, cfg), raise_server_exceptions=False) as c:
        yield c


def _gen(client, **body):
    return client.post("/v1/images/generations", json={"size": f"{S}x{S}", "num_inference_steps": STEPS, **body})


def _bytes(b64: str) -> bytes:
    return base64.b64decode(b64)


def _rgb(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def _upload(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _history(client, **params) -> list[dict]:
    r = client.get("/history", params=params)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "list"
    return r.json()["data"]


# ---------------------------------------------------------------------------------------------- /info
def test_info_for_a_turbo_pipeline(tiny):
    """Read from the configs alone: answering it loads no model (no MLX work off the worker thread)."""
    pipe = ZImagePipeline.from_pretrained(tiny[0], dtype="float32", quantize=None)
    with TestClient(create_app(pipe, _config(max_side=2048))) as c:
        info = c.get("/info").json()
    assert all(m is None for m in pipe._models.values())
    m = pipe.limits.size_multiple
    assert info == {
        "model": "tiny", "variant": "turbo",
        "defaults": {"num_inference_steps": 8, "guidance_scale": 0.0, "strength": 0.6, "inpaint_strength": 1.0,
                     "size": S, "controlnet_conditioning_scale": 0.75},
        "size_multiple": m, "max_side": min(2048, min(pipe.limits.max_patches) * m), "max_pixels": 2048 * 2048,
        "max_body": 25 * 1024 * 1024, "max_n": 10, "max_steps": 200, "loras": [], "controlnet": None,
        "history": {"enabled": False, "max_items": 0}, "enhance": True}
    assert m == 16


def test_info_with_controlnet_lora_and_history(cn_client):
    info = cn_client.get("/info").json()
    assert info["loras"] == [{"name": "style", "weight": 0.5}]
    assert info["controlnet"] == {"control_types": ["none", "canny", "gray"], "inpaint": True}
    assert info["history"] == {"enabled": True, "max_items": 200}


def test_info_and_history_need_the_api_key(pipe, tmp_path):
    with TestClient(create_app(pipe, _config(api_key="k", history_dir=tmp_path)), raise_server_exceptions=False) as c:
        for method, path in [("GET", "/info"), ("GET", "/history"), ("GET", "/history/x.png"),
                             ("DELETE", "/history/x")]:
            assert c.request(method, path).status_code == 401, path
        ok = {"Authorization": "Bearer k"}
        assert c.get("/info", headers=ok).status_code == 200 and c.get("/history", headers=ok).json()["data"] == []


# ---------------------------------------------------------------------------------------------- history
def test_images_are_kept_with_their_parameters_newest_first(client):
    r = _gen(client, prompt="a red fox", n=2, seed=5, negative_prompt="blur")
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    entries = _history(client)[:2]
    assert [e["id"] for e in entries] == [data[1]["history_id"], data[0]["history_id"]]   # newest first
    for item, e in zip(data[::-1], entries):
        assert e["url"] == f"/history/{e['id']}.png" and e["created"] == e["params"]["created"]
        got = client.get(e["url"])
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert got.content == _bytes(item["b64_json"])                   # the very bytes the client got
    assert set(entries[0]["params"]) == KEYS
    assert {k: v for k, v in entries[0]["params"].items() if k not in ("id", "created")} == {
        "prompt": "a red fox", "negative_prompt": "blur", "size": f"{S}x{S}", "num_inference_steps": STEPS,
        "guidance_scale": 0.0, "seed": 6, "strength": None, "loras": {}, "cache": None, "cache_threshold": None,
        "mode": "text-to-image", "control_type": None, "controlnet_conditioning_scale": None,
        "enhance_prompt": False, "revised_prompt": None, "output_format": "png", "model": "tiny"}
    assert [e["id"] for e in _history(client, limit=1)] == [entries[0]["id"]]
    assert client.get("/history", params={"limit": "x"}).json()["error"]["param"] == "limit"


def test_resolved_values_are_kept_and_history_false_keeps_nothing(client):
    src = Image.fromarray(np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8))
    r = client.post("/v1/images/edits", files={"image": ("in.png", _upload(src), "image/png")},
                    data={"prompt": "at night", "seed": "3", "output_format": "webp"})   # default steps, strength
    assert r.status_code == 200, r.text
    e = _history(client)[0]
    assert e["id"] == r.json()["data"][0]["history_id"] and e["url"].endswith(".webp")
    assert client.get(e["url"]).headers["content-type"] == "image/webp"
    p = e["params"]
    assert (p["mode"], p["strength"], p["num_inference_steps"], p["output_format"]) == ("image-to-image", 0.6, 8,
                                                                                      "webp")
    before = [x["id"] for x in _history(client)]
    r = _gen(client, prompt="not kept", seed=1, history=False)
    assert r.status_code == 200 and r.json()["data"][0]["history_id"] is None
    assert [x["id"] for x in _history(client)] == before
    assert _gen(client, prompt="x", history="yes").json()["error"]["param"] == "history"


def test_streamed_completion_carries_the_history_id(client):
    body = {"prompt": "a lighthouse", "seed": 2, "size": f"{S}x{S}", "num_inference_steps": 3, "stream": True,
            "partial_images": 1}
    with client.stream("POST", "/v1/images/generations", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    done = events[-1]
    assert done["type"] == "image_generation.completed" and done["seed"] == 2
    assert done["history_id"] == _history(client)[0]["id"]
    assert client.get(f"/history/{done['history_id']}.png").content == _bytes(done["b64_json"])
    assert "history_id" not in events[0]


def test_count_bound_delete_and_404s(client):
    for k in range(4):
        assert _gen(client, prompt="a boat", seed=10 + k).status_code == 200
    entries = _history(client)
    assert len(entries) == 6 and [e["params"]["seed"] for e in entries[:4]] == [13, 12, 11, 10]
    root = client.app.state.history.root
    assert len(list(root.glob("*.json"))) == 6 and not list(root.glob(".*"))     # the oldest went, no temp files
    victim = entries[1]["id"]
    r = client.delete(f"/history/{victim}")
    assert r.status_code == 200 and r.json() == {"id": victim, "deleted": True}
    assert not list(root.glob(f"{victim}.*"))
    for method, path in [("DELETE", f"/history/{victim}"), ("GET", f"/history/{victim}.png"),
                         ("GET", f"/history/{entries[0]['id']}.jpeg"), ("GET", "/history/..%2F..%2Fetc%2Fpasswd"),
                         ("GET", f"/history/{entries[0]['id']}.json"), ("DELETE", "/history/..%2Fx")]:
        r = client.request(method, path)
        assert r.status_code == 404 and r.json()["error"]["code"] in ("not_found", "unknown_url"), (method, path)
    assert victim not in [e["id"] for e in _history(client)]


def test_history_off(pipe):
    with TestClient(create_app(pipe, _config()), raise_server_exceptions=False) as c:
        assert c.get("/history").json() == {"object": "list", "data": []}
        assert c.delete("/history/00000000000000000001-abcdef01").status_code == 404
        assert _gen(c, prompt="x", seed=1).json()["data"][0]["history_id"] is None
        assert c.app.state.history is None


def test_history_store_bounds_restart_and_traversal(tmp_path):
    h = History(tmp_path, max_items=3, max_bytes=10**6)
    ids = [h.add(bytes([k]) * 100, "png", {"prompt": f"p{k}"}) for k in range(5)]
    assert [e["id"] for e in h.list()] == ids[:1:-1] and ids == sorted(ids)
    assert not (tmp_path / f"{ids[0]}.png").exists() and not (tmp_path / f"{ids[1]}.json").exists()
    assert h.path(ids[4]).read_bytes() == bytes([4]) * 100
    # bounded by bytes: each entry is 1000 image bytes + its JSON; two fit in 2300, three do not
    hb = History(tmp_path / "bytes", max_items=100, max_bytes=2300)
    kept = [hb.add(b"x" * 1000, "png", {}) for _ in range(3)]
    assert [e["id"] for e in hb.list()] == kept[:0:-1]
    assert hb.add(b"x" * 5000, "png", {}) is None and [e["id"] for e in hb.list()] == kept[:0:-1]
    # a restart lists the same; a leftover temporary file and an image without its JSON are removed, other files kept
    (tmp_path / f".{ids[4]}.json.abc123.part").write_bytes(b"{")
    orphan = "00000000000000000001-0123abcd"
    (tmp_path / f"{orphan}.png").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("mine")
    again = History(tmp_path, max_items=3, max_bytes=10**6)
    assert again.list() == h.list()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(
        [f"{i}.{x}" for i in ids[2:] for x in ("png", "json")] + ["notes.txt"])
    for bad in ("../notes", "../../etc/passwd", f"{ids[4]}/..", "", orphan, f"{ids[4]}.png"):
        assert again.path(bad) is None and not again.delete(bad)
    for bad in ("../notes.txt", f"{ids[4]}.json", f"{ids[4]}.jpeg", f"x{ids[4]}.png", "notes.txt"):
        assert again.file(bad) is None
    assert again.delete(ids[4]) and not list(tmp_path.glob(f"{ids[4]}*")) and not again.delete(ids[4])


def test_history_survives_a_new_app_on_the_same_folder(pipe, client):
    cfg = _config(history_dir=client.app.state.history.root, history_items=6)
    with TestClient(create_app(pipe, cfg)) as c:
        assert _history(c) == _history(client)


# ---------------------------------------------------------------------------------------------- ControlNet
def _control() -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8))


def test_multipart_generation_with_a_control_image_equals_the_python_api(cn_client):
    ctrl = _control()
    r = cn_client.post("/v1/images/generations", files={"control_image": ("c.png", _upload(ctrl), "image/png")},
                       data={"prompt": "a dancer", "seed": "11", "num_inference_steps": str(STEPS),
                             "control_type": "canny", "controlnet_conditioning_scale": "0.6"})
    assert r.status_code == 200, r.text
    blob = _bytes(r.json()["data"][0]["b64_json"])
    ref = cn_client.app.state.worker.call(lambda p: p("a dancer", control_image=ctrl, control_type="canny",
                                                      controlnet_conditioning_scale=0.6, seed=11,
                                                      num_inference_steps=STEPS).images[0], 60)
    assert np.array_equal(_rgb(blob), np.asarray(ref))
    meta = Image.open(io.BytesIO(blob)).text
    assert (meta["control_type"], meta["control_scale"], meta["control_image"]) == ("canny", "0.6", "upload")
    p = _history(cn_client)[0]["params"]
    assert (p["mode"], p["control_type"], p["controlnet_conditioning_scale"], p["loras"]) == (
        "controlnet", "canny", 0.6, {"style": 0.5})


def test_controlnet_inpainting_edit_equals_the_python_api(cn_client):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(np.arange(S)[None, :] < S // 2, 255, 0).astype(np.uint8).repeat(S, 0))
    ctrl = _control()
    files = {"image": ("i.png", _upload(image), "image/png"), "mask": ("m.png", _upload(mask), "image/png"),
             "control_image": ("c.png", _upload(ctrl), "image/png")}
    r = cn_client.post("/v1/images/edits", files=files, data={"prompt": "a hat", "seed": "4",
                                                              "num_inference_steps": str(STEPS),
                                                              "loras": '{"style": 0.25}'})
    assert r.status_code == 200, r.text
    ref = cn_client.app.state.worker.call(lambda p: p("a hat", image=image, mask_image=mask, control_image=ctrl,
                                                      seed=4, num_inference_steps=STEPS,
                                                      loras={"style": 0.25}).images[0], 60)
    assert np.array_equal(_rgb(_bytes(r.json()["data"][0]["b64_json"])), np.asarray(ref))
    p = _history(cn_client)[0]["params"]
    assert (p["mode"], p["control_type"], p["controlnet_conditioning_scale"], p["strength"], p["loras"]) == (
        "controlnet-inpaint", "none", 0.75, None, {"style": 0.25})


@pytest.mark.parametrize("fields,param,fragment", [
    ({"control_type": "depth"}, "control_type", "none, canny, gray"),
    ({"controlnet_conditioning_scale": "nan"}, "controlnet_conditioning_scale", "finite"),
    ({"controlnet_conditioning_scale": "1000"}, "controlnet_conditioning_scale", "between"),
    ({"control_image": "c.png"}, "control_image", "must be a file"),
])
def test_bad_control_fields(cn_client, fields, param, fragment):
    files = {"control_image": ("c.png", _upload(_control()), "image/png")} if "control_image" not in fields else \
        {"unused": ("u.png", b"x", "image/png")}
    r = cn_client.post("/v1/images/generations", files=files, data={"prompt": "x", **fields})
    assert r.status_code == 400 and r.json()["error"]["param"] == param and fragment in r.json()["error"]["message"]


def test_control_image_without_a_controlnet_is_400(client):
    r = client.post("/v1/images/generations", files={"control_image": ("c.png", _upload(_control()), "image/png")},
                    data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "control_image"
    assert "no ControlNet" in r.json()["error"]["message"]
    r = client.post("/v1/images/generations", files={"control_image": ("c.png", b"not an image", "image/png")},
                    data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "control_image"
    assert _gen(client, prompt="x", control_type="depth").json()["error"]["param"] == "control_type"


# ---------------------------------------------------------------------------------------------- the CLI command
def test_serve_command_with_history_and_controlnet(tiny, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from zimage_mlx.apps import serve_cmd
    from zimage_mlx.apps.cli import cli

    root, cn, lora = tiny
    seen = {}

    def fake_serve(app, sock, verbose):
        with TestClient(app) as c:
            seen["info"] = c.get("/info").json()
            r = c.post("/v1/images/generations", files={"control_image": ("c.png", _upload(_control()), "image/png")},
                       data={"prompt": "a fox", "size": "32x32", "num_inference_steps": "2", "seed": "9"})
            seen["id"] = r.json()["data"][0]["history_id"]
            seen["history"] = c.get("/history").json()["data"]

    monkeypatch.setattr(serve_cmd, "serve_forever", fake_serve)
    r = CliRunner().invoke(cli, ["serve", "--model", str(root), "--quantize", "none", "--dtype", "float32",
                                 "--port", "0", "--controlnet", str(cn), "--lora", f"{lora}:0.5",
                                 "--history-dir", str(tmp_path / "h"), "--history", "5", "--history-mb", "1"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert seen["info"]["controlnet"]["control_types"] == ["none", "canny", "gray"]
    assert seen["info"]["history"] == {"enabled": True, "max_items": 5}
    assert seen["info"]["loras"] == [{"name": "style", "weight": 0.5}]
    assert [e["id"] for e in seen["history"]] == [seen["id"]] and (tmp_path / "h" / f"{seen['id']}.png").is_file()
    assert seen["history"][0]["params"]["mode"] == "controlnet"


def test_serve_with_an_unwritable_history_folder_is_one_line_and_exit_1(tiny, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from zimage_mlx.apps.cli import cli

    loads = []
    monkeypatch.setattr(ZImagePipeline, "from_pretrained", classmethod(lambda cls, *a, **kw: loads.append(a)))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ZIMAGE_MLX_STATE", str(blocker))        # the default folder: $ZIMAGE_MLX_STATE/history
    r = CliRunner().invoke(cli, ["serve", "--model", str(tiny[0]), "--port", "0"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and not loads, r.output
    assert f"cannot write the history folder {blocker / 'history'}" in lines[0] and "--history 0" in lines[0]
    r = CliRunner().invoke(cli, ["serve", "--model", str(tiny[0]), "--port", "0", "--history-dir", str(blocker / "h")])
    assert r.exit_code == 1 and f"cannot write the history folder {blocker / 'h'}" in r.output, r.output
    r = CliRunner().invoke(cli, ["serve", "--model", str(tiny[0]), "--port", "0", "--history-dir", str(blocker)])
    assert r.exit_code == 2 and "is a file" in r.output and not loads, r.output             # a usage error
