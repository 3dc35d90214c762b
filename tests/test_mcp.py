"""The MCP server (apps/mcp_server.py) with the official SDK's own client: in-process, over streamable HTTP (a real
uvicorn on 127.0.0.1) and over stdio (a subprocess), on a tiny random checkpoint."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import anyio
import numpy as np
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from PIL import Image

from live_server import LiveServer
from make_pipeline import save_tiny_pipeline

from zimage_mlx import ZImagePipeline
from zimage_mlx.apps.mcp_server import ZImageMCP, http_app

REPO = Path(__file__).resolve().parents[1]
SIZE = dict(width=32, height=32, num_inference_steps=2)
TOOLS = {"generate_image", "edit_image", "list_loras", "enhance_prompt"}


@pytest.fixture(scope="module")
def root(tmp_path_factory, qwen_tokenizer_dir):
    root, _ = save_tiny_pipeline(tmp_path_factory.mktemp("mcp") / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    return root


@pytest.fixture(scope="module")
def pipe(root):
    return ZImagePipeline.from_pretrained(root, dtype="float32", quantize=None, keep_text_encoder=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("mcp-files")
    (base / "allowed").mkdir()
    (base / "outside").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
        base / "allowed" / "photo.png")
    Image.fromarray(np.full((40, 48, 3), 9, np.uint8)).save(base / "outside" / "secret.png")
    (base / "allowed" / "notes.png").write_text("not an image")
    (base / "allowed" / "link.png").symlink_to(base / "outside" / "secret.png")
    return base


@pytest.fixture(scope="module")
def app(pipe, folders):
    return ZImageMCP(pipe, output_dir=folders / "out", allow_dirs=[folders / "allowed"], model="tiny")


def call(server, name, args, progress=None):
    async def go():
        async with Client(server) as client:
            return await client.call_tool(name, args, progress_callback=progress)
    return anyio.run(go)


def images(result) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(c.data)))) for c in result.content if c.type == "image"]


def summary(result) -> list[dict]:
    return json.loads(next(c.text for c in result.content if c.type == "text"))


def reference(pipe, prompt, seed, **kw) -> np.ndarray:
    return np.asarray(pipe(prompt, seed=seed, **{**SIZE, **kw}).images[0])


def error(result) -> str:
    assert result.is_error, result
    (text,) = [c.text for c in result.content]
    assert "\n" not in text and "Traceback" not in text
    return text


def test_lists_four_tools_in_process(app):
    async def go():
        async with Client(app.server()) as client:
            return await client.list_tools()
    tools = anyio.run(go).tools
    assert {t.name for t in tools} == TOOLS
    gen = next(t for t in tools if t.name == "generate_image")
    assert set(gen.input_schema["properties"]) == {"prompt", "width", "height", "num_inference_steps", "seed", "n",
                                                   "negative_prompt", "guidance_scale", "loras", "enhance_prompt"}


def test_generate_image_equals_the_python_api_with_progress(app, pipe, folders):
    seen = []

    async def progress(done, total, message):
        seen.append((done, total, message))
    r = call(app.server(), "generate_image", {"prompt": "a red fox", "seed": 11, "n": 2, **SIZE}, progress)
    assert not r.is_error, r
    got = images(r)
    assert len(got) == 2
    for k in range(2):
        np.testing.assert_array_equal(got[k], reference(pipe, "a red fox", 11 + k))
    info = summary(r)
    assert [i["seed"] for i in info] == ["11", "12"] and info[0]["prompt"] == "a red fox"
    for i, img in zip(info, got):
        path = Path(i["path"])
        assert path.parent == folders / "out"
        np.testing.assert_array_equal(np.asarray(Image.open(path)), img)
    assert [s[:2] for s in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert seen[-1][2] == "image 2/2: step 2/2"


def test_edit_image_from_a_path_and_from_base64(app, pipe, folders):
    photo = folders / "allowed" / "photo.png"
    r = call(app.server(), "edit_image", {"prompt": "a cat", "image": str(photo), "seed": 3, "strength": 0.5,
                                          "num_inference_steps": 2})
    assert not r.is_error, r
    ref = np.asarray(pipe("a cat", image=Image.open(photo).convert("RGB"), strength=0.5, seed=3,
                          num_inference_steps=2).images[0])
    np.testing.assert_array_equal(images(r)[0], ref)
    assert images(r)[0].shape == (32, 48, 3)            # the input's size floored to the multiple of 16
    b64 = base64.b64encode(photo.read_bytes()).decode()
    mask = Image.new("L", (48, 40), 0)
    mask.paste(255, (0, 0, 24, 40))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    r2 = call(app.server(), "edit_image", {"prompt": "a cat", "image": "data:image/png;base64," + b64, "seed": 3,
                                           "mask": base64.b64encode(buf.getvalue()).decode(),
                                           "num_inference_steps": 2})
    assert not r2.is_error, r2
    ref2 = np.asarray(pipe("a cat", image=Image.open(photo).convert("RGB"), mask_image=mask, seed=3,
                           num_inference_steps=2).images[0])
    np.testing.assert_array_equal(images(r2)[0], ref2)


def test_enhance_prompt_tool_and_argument(app, pipe, monkeypatch):
    full = ZImagePipeline.enhance_prompt
    monkeypatch.setattr(ZImagePipeline, "enhance_prompt",
                        lambda self, prompt, **kw: full(self, prompt, **{"max_new_tokens": 6, **kw}))
    r = call(app.server(), "enhance_prompt", {"prompt": "a fox", "seed": 2})
    expected = pipe.enhance_prompt("a fox", seed=2)
    assert not r.is_error and r.content[0].text == expected
    g = call(app.server(), "generate_image", {"prompt": "a fox", "seed": 2, "enhance_prompt": True, **SIZE})
    assert not g.is_error, g
    info = summary(g)[0]
    assert info["prompt"] == expected and info["original_prompt"] == "a fox"
    np.testing.assert_array_equal(images(g)[0], reference(pipe, expected, 2))


def test_list_loras(app):
    r = call(app.server(), "list_loras", {})
    assert not r.is_error and json.loads(r.content[0].text) == []


@pytest.mark.parametrize("name, args, message", [
    ("generate_image", {"prompt": "a cat", "colour": "red"}, "unknown argument(s) 'colour'"),
    ("generate_image", {}, "missing required argument(s) 'prompt'"),
    ("generate_image", {"prompt": "  "}, "'prompt' must be a non-empty string"),
    ("generate_image", {"prompt": "a cat", "width": 33}, "width"),
    ("generate_image", {"prompt": "a cat", "n": 0}, "'n' must be an integer from 1 to 8"),
    ("generate_image", {"prompt": "a cat", "seed": "x"}, "seed"),
    ("generate_image", {"prompt": "a cat", "loras": {"nope": 1.0}}, "nope"),
    ("generate_image", {"prompt": "a cat", "enhance_prompt": "yes"}, "'enhance_prompt' must be true or false"),
    ("edit_image", {"prompt": "a cat", "image": "outside/secret.png"}, "outside the allowed folders"),
    ("edit_image", {"prompt": "a cat", "image": "/etc/passwd"}, "outside the allowed folders"),
    ("edit_image", {"prompt": "a cat", "image": "LINK"}, "outside the allowed folders"),
    ("edit_image", {"prompt": "a cat", "image": "NOTES"}, "is not a readable image"),
    ("edit_image", {"prompt": "a cat", "image": "MISSING"}, "no file"),
    ("edit_image", {"prompt": "a cat", "image": "data:image/png;base64,aGVsbG8="}, "is not a readable image"),
    ("edit_image", {"prompt": "a cat", "image": "PHOTO", "strength": 2}, "strength"),
    ("list_loras", {"x": 1}, "unknown argument(s) 'x'"),
    ("draw", {}, "unknown tool 'draw'"),
])
def test_bad_calls_are_one_line_tool_errors(app, folders, name, args, message):
    where = {"LINK": folders / "allowed" / "link.png", "NOTES": folders / "allowed" / "notes.png",
             "MISSING": folders / "allowed" / "missing.png", "PHOTO": folders / "allowed" / "photo.png",
             "outside/secret.png": folders / "outside" / "secret.png"}
    args = {k: str(where.get(v, v)) if isinstance(v, str) else v for k, v in args.items()}
    assert message in error(call(app.server(), name, args))


def lists_tools_and_generates(client, pipe):
    """Through an SDK `client` (not yet entered): four tools, and generate_image gives the Python API's pixels;
    returns the tool result."""
    async def go():
        async with client as c:
            tools = await c.list_tools()
            return tools, await c.call_tool("generate_image", {"prompt": "a lighthouse", "seed": 5, **SIZE})
    tools, r = anyio.run(go)
    assert {t.name for t in tools.tools} == TOOLS
    assert not r.is_error, r
    np.testing.assert_array_equal(images(r)[0], reference(pipe, "a lighthouse", 5))
    return r


def test_over_streamable_http(app, pipe):
    with LiveServer(http_app(app)) as live:
        lists_tools_and_generates(Client(f"{live.url}/mcp"), pipe)


STDIO_LAUNCHER = """
import sys
from zimage_mlx import ZImagePipeline
from zimage_mlx.apps.mcp_server import ZImageMCP, run_stdio
pipe = ZImagePipeline.from_pretrained(sys.argv[1], dtype="float32", quantize=None)
run_stdio(ZImageMCP(pipe, output_dir=sys.argv[2], model="tiny"))
"""


def stdio_generation(args: list[str], pipe, tmp_path):
    """A subprocess serving MCP on its stdin/stdout (started with `args`), driven by the SDK's stdio client: it lists
    the tools, and generate_image gives the Python API's pixels, saved under tmp_path/out."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    params = StdioServerParameters(command=sys.executable, cwd=str(tmp_path), env=env, args=args)
    r = lists_tools_and_generates(Client(params, read_timeout_seconds=300), pipe)
    assert Path(summary(r)[0]["path"]).parent == tmp_path / "out"


def test_over_stdio(root, pipe, tmp_path):
    """A launcher script serving on stdio."""
    stdio_generation(["-c", STDIO_LAUNCHER, str(root), str(tmp_path / "out")], pipe, tmp_path)


def test_over_stdio_with_the_command(root, pipe, tmp_path):
    stdio_generation(["-m", "zimage_mlx", "mcp", "--model", str(root), "--dtype", "float32", "--quantize", "none",
                      "--output-dir", str(tmp_path / "out")], pipe, tmp_path)


def test_http_command_lists_the_tools(root, tmp_path):
    """`zimage-mlx mcp --http --port 0`: loopback, the port it bound printed on stderr, the four tools there."""
    import re
    import subprocess
    import threading

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "zimage_mlx", "mcp", "--http", "--port", "0", "--model",
                             str(root), "--dtype", "float32", "--quantize", "none", "--output-dir",
                             str(tmp_path / "out")], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    watchdog = threading.Timer(300, proc.kill)   # a hang before serving ends the process, so the read below ends
    watchdog.start()
    try:
        url = None
        for line in proc.stderr:            # until the server says where it listens (or exits)
            m = re.search(r"serving MCP on (http://127\.0\.0\.1:\d+/mcp)", line)
            if m:
                url = m[1]
                break
        assert url, "the command ended without serving"

        async def go():
            async with Client(url) as client:
                return await client.list_tools()
        assert {t.name for t in anyio.run(go).tools} == TOOLS
    finally:
        watchdog.cancel()
        proc.terminate()
        proc.wait(30)
