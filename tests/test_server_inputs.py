"""Every bad value refused where it enters the server: a 400 (or 413) naming the parameter, never a 500, never a
traceback in the log, and the server goes on. Table-driven: one row per bad input."""

from __future__ import annotations

import io
import socket
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from live_server import LiveServer, wait_for
from make_lora import as_peft, random_lora, save
from make_pipeline import save_tiny_pipeline

from zimage_mlx import ZImagePipeline
from zimage_mlx.apps.server import ServerConfig, create_app


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, qwen_tokenizer_dir):
    """The tiny pipeline with one LoRA loaded as "style" (the server's --lora), so weights reach the adapters."""
    tmp = tmp_path_factory.mktemp("inputs")
    root, models = save_tiny_pipeline(tmp / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    lora = save(tmp / "style.safetensors", as_peft(random_lora(models["transformer"], strength=0.2, seed=3)))
    p = ZImagePipeline.from_pretrained(root, dtype="float32", quantize=None, keep_text_encoder=True)
    p.load_lora_weights(lora, adapter_name="style")
    return p


def _config(**kw):
    return ServerConfig(**{"default_size": 32, "model": "tiny", "loras": {"style": 1.0}, **kw})


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, _config()), raise_server_exceptions=False) as c:
        yield c


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


OK = '"prompt": "a fox", "size": "32x32", "num_inference_steps": 1'
# (raw JSON body, the parameter the 400 names, a fragment of its message)
JSON_CASES = [
    ('{%s, "loras": [{"name": ["x"]}]}' % OK, "loras", "must map adapter names"),
    ('{%s, "loras": [{"name": {"a": 1}}]}' % OK, "loras", "must map adapter names"),
    ('{%s, "loras": [1, 2]}' % OK, "loras", "'loras' must map adapter names to weights"),
    ('{%s, "loras": [null]}' % OK, "loras", "must map adapter names"),
    ('{%s, "loras": {"style": NaN}}' % OK, "loras", "finite number"),
    ('{%s, "loras": {"style": Infinity}}' % OK, "loras", "finite number"),
    ('{%s, "loras": {"style": 1e300}}' % OK, "loras", "finite number"),
    ('{%s, "loras": {"style": 1e309}}' % OK, "loras", "finite number"),
    ('{%s, "loras": {"style": 1%s}}' % (OK, "0" * 400), "loras", "finite number"),
    ('{%s, "loras": {"style": "0.5"}}' % OK, "loras", "finite number"),
    ('{%s, "loras": {"\\ud800": 1}}' % OK, "loras", "no LoRA named"),
    ('{"prompt": "\\ud800 fox", "size": "32x32"}', "prompt", "lone surrogate"),
    ('{%s, "negative_prompt": "a \\udfff"}' % OK, "negative_prompt", "lone surrogate"),
    ('{%s, "guidance_scale": NaN}' % OK, "guidance_scale", "finite number"),
    ('{%s, "strength": Infinity}' % OK, "strength", "finite number"),
    ('{%s, "guidance_scale": 1%s}' % (OK, "0" * 400), "guidance_scale", "finite number"),
    ('{"prompt": "x", "size": "\\ud800"}', "size", "WIDTHxHEIGHT"),
    ('{"prompt": "x", "response_format": "\\ud800"}', "response_format", "lone surrogate"),
]


@pytest.mark.parametrize("raw, param, message", JSON_CASES, ids=[str(i) for i in range(len(JSON_CASES))])
def test_bad_json_values_are_400_naming_the_parameter(client, raw, param, message):
    failed = client.get("/health").json()["failed"]
    r = client.post("/v1/images/generations", content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err
    assert client.get("/health").json()["failed"] == failed        # refused before it reached the worker


def test_a_valid_lora_weight_still_works(client):
    r = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "32x32", "num_inference_steps": 1,
                                                    "seed": 1, "loras": [{"name": "style", "weight": 0.5}]})
    assert r.status_code == 200, r.text


FORM = {"prompt": "a fox", "num_inference_steps": "1"}
# (multipart fields as (name, (filename or None, bytes)), the parameter named, a fragment of the message)
FORM_CASES = [
    ([("prompt", (None, b"\xff\xfe bad"))], "prompt", "not valid UTF-8"),
    ([("negative_prompt", (None, b"caf\xe9"))], "negative_prompt", "not valid UTF-8"),
    ([("size", (None, b"32x32\x80"))], "size", "not valid UTF-8"),
    ([("strength", (None, b"nan"))], "strength", "finite number"),
    ([("loras", (None, b'{"style": NaN}'))], "loras", "finite number"),
    ([("loras", (None, b"[1, 2]"))], "loras", "must map adapter names"),
    ([("mask", ("m.png", b"not a png"))], "mask", "not an image"),
]


@pytest.mark.parametrize("fields, param, message", FORM_CASES, ids=[str(i) for i in range(len(FORM_CASES))])
def test_bad_multipart_fields_are_400_naming_the_field(client, fields, param, message):
    image = ("image", ("in.png", _png(Image.new("RGB", (32, 32), "teal")), "image/png"))
    names = {n for n, _ in fields}
    files = [image, *[(k, (None, v.encode())) for k, v in FORM.items() if k not in names], *fields]
    r = client.post("/v1/images/edits", files=files)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err


# ---------------------------------------------------------------------------------------------- real sockets
def _chunked_upload(url: str, path: str, total: int, content_type: str) -> tuple[int, bytes]:
    """POST `total` bytes with Transfer-Encoding: chunked, stopping as soon as the server answers; (bytes sent,
    the answer)."""
    host, port = url.removeprefix("http://").split(":")
    sent, chunk = 0, b"\0" * 65536
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        s.setblocking(False)
        answer = b""
        while sent < total:
            try:
                answer += s.recv(65536)
                break                               # the server has answered: stop sending
            except BlockingIOError:
                pass
            except ConnectionError:
                break
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            except (BlockingIOError, ConnectionError):
                time.sleep(0.01)
        s.setblocking(True)
        try:
            while b"\r\n\r\n" not in answer:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionError:
            pass
    return sent, answer


@pytest.mark.parametrize("path, content_type", [
    ("/v1/images/edits", "multipart/form-data; boundary=xyz"),
    ("/v1/images/generations", "application/json"),
])
def test_a_chunked_upload_over_the_limit_is_413_while_it_streams(pipe, path, content_type):
    limit, total = 1 << 20, 64 << 20
    with LiveServer(create_app(pipe, _config(max_body=limit))) as srv:
        sent, answer = _chunked_upload(srv.url, path, total, content_type)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < total // 2          # reading stopped at the limit; the client was told long before the end


def test_a_truncated_body_is_no_error_in_the_log(pipe, capfd):
    """A client that goes away mid-upload is not a server error: no ClientDisconnect traceback, and the next
    request is served."""
    import httpx

    with LiveServer(create_app(pipe, _config())) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        for path in ("/v1/images/edits", "/v1/images/generations"):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                          "Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; ".encode())
        body = {"prompt": "a fox", "size": "32x32", "num_inference_steps": 1, "seed": 2}
        r = wait_for(lambda: httpx.post(f"{srv.url}/v1/images/generations", json=body, timeout=60))
        assert r.status_code == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ClientDisconnect" not in err and "Exception" not in err, err


def test_the_same_rgba_mask_means_transparent_is_edited(client, pipe):
    """OpenAI's rule on the server: alpha 0 = the area to edit; the pipeline gets white = repaint there."""
    rng = np.random.default_rng(4)
    src = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[8:24, 8:24] = 0
    mask = Image.fromarray(np.dstack([np.full((32, 32, 3), 255, np.uint8), alpha]), "RGBA")
    r = client.post("/v1/images/edits", files={"image": ("i.png", _png(src), "image/png"),
                                               "mask": ("m.png", _png(mask), "image/png")},
                    data={"prompt": "a window", "seed": "5", "num_inference_steps": "2"})
    assert r.status_code == 200, r.text
    import base64

    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
    white = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))
    ref = client.app.state.worker.call(lambda p: np.asarray(p(prompt="a window", image=src, mask_image=white, seed=5,
                                                               height=32, width=32, num_inference_steps=2).images[0]))
    assert np.array_equal(out, ref)
