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
def fast(tmp_path_factory, qwen_tokenizer_dir) -> list[str]:
    root, _ = save_tiny_pipeline(tmp_path_factory.mktemp("examples") / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    return ["--model", str(root), "--dtype", "float32", "--quantize", "none"]


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
