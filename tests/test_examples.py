"""The scripts in examples/ run as `python examples/x.py --model DIR` against a tiny random checkpoint (float32, CPU)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from make_pipeline import save_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen_tokenizer_dir):
    return save_tiny_pipeline(tmp_path_factory.mktemp("examples") / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def fast(tiny) -> list[str]:
    return ["--model", str(tiny[0]), "--dtype", "float32", "--quantize", "none"]


def example(name: str, *args, cwd: Path) -> str:
    r = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_text_to_image(fast, tmp_path):
    out = example("text_to_image.py", "a red fox", *fast, "--width", 64, "--height", 48, "--steps", 2,
                  "--output", "fox.png", cwd=tmp_path)
    assert "saved fox.png" in out
    assert Image.open(tmp_path / "fox.png").size == (64, 48)


def test_image_to_image(fast, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (56, 70, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    out = example("image_to_image.py", "in.png", "a watercolor", *fast, "--strength", 0.5, "--steps", 4,
                  "--output", "out.png", cwd=tmp_path)
    assert "saved out.png (64x48" in out                    # the input's size, floored to multiples of 16
    assert Image.open(tmp_path / "out.png").size == (64, 48)


def test_preview_every_step(fast, tmp_path):
    out = example("preview_callback.py", *fast, "--width", 64, "--height", 48, "--steps", 3,
                  "--preview", "pv-{step}.png", cwd=tmp_path)
    assert "saved preview_callback.png" in out
    for k in (1, 2, 3):
        assert Image.open(tmp_path / f"pv-{k}.png").size == (32, 24)   # 2x-downsampled latents
    assert not list(tmp_path.glob(".*.part"))


def test_preview_cancelled_by_time_limit(fast, tmp_path):
    out = example("preview_callback.py", *fast, "--width", 64, "--height", 48, "--steps", 3, "--time-limit", 0,
                  cwd=tmp_path)
    assert "cancelled" in out and "step 1 " in out and "step 2 " not in out
    assert (tmp_path / "preview.png").is_file() and not (tmp_path / "preview_callback.png").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_preview_cancelled_by_ctrl_c(fast, tmp_path):
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "preview_callback.py"), *fast, "--width", "64",
                             "--height", "48", "--steps", "1000"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()                      # the first step's preview is written
        assert first.startswith("step 1 "), first + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        t0 = time.perf_counter()
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "cancelled" in rest and time.perf_counter() - t0 < 30
    assert not (tmp_path / "preview_callback.png").exists()


def test_lora_with_and_without(tiny, fast, tmp_path):
    from make_lora import as_peft, peft_metadata, random_lora, save

    lora = random_lora(tiny[1]["transformer"], rank=4, alpha=6.0, seed=3, strength=0.5)
    save(tmp_path / "style.safetensors", as_peft(lora), peft_metadata(lora))
    out = example("lora.py", "a red fox", "style.safetensors:0.8", *fast, "--width", 64, "--height", 48, "--steps", 2,
                  cwd=tmp_path)
    assert "saved lora-with.png (with style:0.8" in out and "saved lora-without.png" in out
    with_, without = (np.asarray(Image.open(tmp_path / f"lora-{k}.png"), np.float32) for k in ("with", "without"))
    assert with_.shape == (48, 64, 3) and np.abs(with_ - without).mean() > 1.0   # the LoRA changed the image


def test_inpaint_with_and_without_controlnet(tiny, fast, tmp_path):
    from make_controlnet import make_tiny_controlnet, save_tiny_controlnet

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "room.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = example("inpaint.py", "room.png", "mask.png", "a red armchair", *fast, "--steps", 2, cwd=tmp_path)
    assert "saved inpaint.png (64x48" in out
    save_tiny_controlnet(tmp_path / "cn", make_tiny_controlnet(5, "2.1"))
    out = example("inpaint.py", "room.png", "mask.png", "a red armchair", *fast, "--steps", 2, "--controlnet", "cn",
                  "--output", "controlled.png", cwd=tmp_path)
    assert "saved controlled.png (64x48, canny ControlNet" in out
    plain, controlled = (np.asarray(Image.open(tmp_path / f), np.float32) for f in ("inpaint.png", "controlled.png"))
    assert np.abs(plain - controlled).mean() > 1.0            # the canny hints changed the repainted content


def test_openai_client_against_a_live_server(tiny, tmp_path):
    from live_server import LiveServer

    from zimage_mlx import ZImagePipeline
    from zimage_mlx.apps.server import create_app

    pipe = ZImagePipeline.from_pretrained(tiny[0], dtype="float32", keep_text_encoder=True)
    with LiveServer(create_app(pipe)) as server:
        r = subprocess.run([sys.executable, str(EXAMPLES / "openai_client.py"), "a lighthouse", "--url",
                            f"{server.url}/v1", "--size", "64x48", "-n", "2", "--seed", "7", "--steps", "2"],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["saved", "openai-7.png", "saved", "openai-8.png"]
    ours = pipe(prompt="a lighthouse", width=64, height=48, num_inference_steps=2, seed=8).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "openai-8.png")), np.asarray(ours))
