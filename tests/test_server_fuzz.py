"""A bounded, seeded fuzz of the server's two POST endpoints: random mutations of a valid JSON body and a valid
multipart body (types, sizes, encodings, truncation, duplicate fields, stray bytes). Pass: no 5xx, nothing logged
at ERROR, /health consistent with what was answered, and the next valid request still gives the exact image the
Python API gives. The server's limits are small (64² images, 64 KiB bodies) so accepted requests stay cheap."""

from __future__ import annotations

import base64
import io
import json
import logging
import random

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from make_pipeline import save_tiny_pipeline

from zimage_mlx import ZImagePipeline
from zimage_mlx.apps.server import ServerConfig, create_app

SEED = 20261207
REQUESTS = 250
VALID_JSON = {"prompt": "a red fox", "size": "32x32", "num_inference_steps": 1, "seed": 3}
VALID_FORM = {"prompt": "the same, at night", "num_inference_steps": "2", "strength": "0.5", "seed": "4"}
VALUES = [None, True, False, 0, 1, 2, -1, 1.5, 2**64, 10**30, "", "x", "32x32", "64x16", "nan", "1e309", "\ud800",
          "é" * 300, [], {}, [1, 2], {"a": 1}, [{"name": ["x"]}], {"x": float("nan")}, "url", "png", "webp"]
FIELDS = ["prompt", "negative_prompt", "n", "size", "seed", "num_inference_steps", "guidance_scale", "strength",
          "response_format", "output_format", "output_compression", "stream", "partial_images", "loras", "model",
          "user", "mask", "image", "nonsense", "control_type", "controlnet_conditioning_scale", "history",
          "control_image"]


@pytest.fixture(scope="module")
def client(tmp_path_factory, qwen_tokenizer_dir):
    root, _ = save_tiny_pipeline(tmp_path_factory.mktemp("fuzz") / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32", quantize=None, keep_text_encoder=True)
    cfg = ServerConfig(model="tiny", default_size=32, max_side=64, max_pixels=64 * 64, max_body=64 * 1024)
    with TestClient(create_app(pipe, cfg), raise_server_exceptions=False) as c:
        yield c


def _png(size=(32, 32), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "teal").save(buf, format="PNG")
    return buf.getvalue()


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "fuzzb0undary") -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode("utf-8", "surrogatepass") + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _encode(v) -> bytes:
    text = v if isinstance(v, str) else json.dumps(v)
    return text.encode("utf-8", "surrogatepass")


def _mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    kind = rng.choice(["truncate", "flip", "insert", "repeat"])
    i = rng.randrange(len(raw) + 1)
    if kind == "truncate":
        return raw[:i]
    if kind == "flip" and raw:
        i = min(i, len(raw) - 1)
        return raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1:]
    if kind == "insert":
        return raw[:i] + rng.choice([b"\xff\xfe", b"\x00", b"\"", b"}", b"\r\n--", b"\xed\xa0\x80"]) + raw[i:]
    return raw + raw[: rng.randrange(1, 64 * 1024)]


def _json_case(rng: random.Random) -> tuple[bytes, dict]:
    body = dict(VALID_JSON)
    for _ in range(rng.randrange(1, 4)):
        op = rng.random()
        if op < 0.6:
            body[rng.choice(FIELDS)] = rng.choice(VALUES)
        elif op < 0.8:
            body.pop(rng.choice(list(body)), None)
    raw = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    if rng.random() < 0.15:                            # a duplicate key: the last one wins in json.loads
        raw = raw[:-1] + b', "prompt": ' + _encode(rng.choice(VALUES)) + b"}"
    if rng.random() < 0.3:
        raw = _mutate_bytes(rng, raw)
    headers = {"content-type": rng.choice(["application/json"] * 4 + ["text/plain", "multipart/form-data"])}
    return raw, headers


def _form_case(rng: random.Random) -> tuple[bytes, dict]:
    parts = [("image", "in.png", _png())] + [(k, None, v.encode()) for k, v in VALID_FORM.items()]
    for _ in range(rng.randrange(1, 4)):
        op = rng.random()
        if op < 0.4:
            parts.append((rng.choice(FIELDS), None, _encode(rng.choice(VALUES))))
        elif op < 0.55:
            parts.append((rng.choice(["image", "mask", "image[]"]), "f.png",
                          rng.choice([_png((64, 64)), _png((8, 8)), _png((32, 32), "RGBA"), _png((40, 24), "LA"),
                                      b"not an image", _png()[:50], b""])))
        elif op < 0.7:
            parts.append((rng.choice(["prompt", "size", "negative_prompt"]), None, b"\xff\xfe bad"))
        elif op < 0.85 and len(parts) > 1:
            parts.pop(rng.randrange(len(parts)))
        else:
            parts.append(parts[rng.randrange(len(parts))])          # a duplicate field
    raw = _multipart(parts)
    if rng.random() < 0.3:
        raw = _mutate_bytes(rng, raw)
    boundary = rng.choice(["fuzzb0undary"] * 5 + ["other", ""])
    return raw, {"content-type": f"multipart/form-data; boundary={boundary}" if boundary else "multipart/form-data"}


def _images_in(r) -> int:
    """Images a 200 answer delivered (a JSON list, or the completed events of a stream)."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        return r.text.count("event: image_generation.completed")
    return len(r.json()["data"])


def _reference(client, **kw) -> np.ndarray:
    return client.app.state.worker.call(lambda p: np.asarray(p(**kw).images[0]), 60)


def _sweep_cases():
    """Every field of both endpoints set to every value once, the rest of the body valid (one mutation each); the
    fields the server ignores (model, user, unknown names) are left to the random cases."""
    for field in FIELDS:
        if field in ("model", "user", "nonsense"):
            continue
        for value in VALUES:
            raw = json.dumps({**VALID_JSON, field: value}).encode()
            yield "/v1/images/generations", raw, {"content-type": "application/json"}
            parts = [("image", "in.png", _png())] + [(k, None, v.encode()) for k, v in VALID_FORM.items() if k != field]
            text = value if isinstance(value, str) else json.dumps(value)
            raw = _multipart(parts + [(field, None, text.encode("utf-8", "surrogatepass"))])
            yield "/v1/images/edits", raw, {"content-type": "multipart/form-data; boundary=fuzzb0undary"}


def _random_cases(n: int):
    rng = random.Random(SEED)
    for _ in range(n):
        if rng.random() < 0.5:
            yield ("/v1/images/generations", *_json_case(rng))
        else:
            yield ("/v1/images/edits", *_form_case(rng))


def _post_all(client, cases) -> dict:
    """Post each case; no 5xx, every refusal in OpenAI's error shape. Returns {status: count, "images": n}."""
    seen = {"images": 0}
    for i, (path, raw, headers) in enumerate(cases):
        r = client.post(path, content=raw, headers=headers)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (i, path, raw[:300], r.text[:500])
        if r.status_code == 200:
            seen["images"] += _images_in(r)
        else:
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error", (i, r.text)
    return seen


@pytest.mark.parametrize("cases", ["sweep", "random"])
def test_fuzzed_bodies_never_give_a_5xx_and_the_server_stays_exact(client, caplog, cases):
    caplog.set_level(logging.WARNING)
    expected = _reference(client, prompt="a red fox", height=32, width=32, num_inference_steps=1, seed=3)
    before = client.get("/health").json()
    seen = _post_all(client, _sweep_cases() if cases == "sweep" else _random_cases(REQUESTS))
    print(cases, seen)
    assert seen.get(400, 0) > 100 and seen.get(200, 0) > 10                  # both sides were exercised
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["queue"] == 0 and not health["running"]
    assert health["images"] - before["images"] == seen["images"] and health["failed"] == 0
    r = client.post("/v1/images/generations", json=VALID_JSON)
    assert r.status_code == 200
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
    assert np.array_equal(got, expected)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text
