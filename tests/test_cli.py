"""The command line (`python -m zimage_mlx.generate`, `zimage-mlx`) on a tiny random checkpoint, in float32 on the CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from make_pipeline import save_tiny_pipeline

from zimage_mlx import __version__
from zimage_mlx.apps.cli import cli, generate
from zimage_mlx.apps.pngfile import read_png_params, save_png

REPO = Path(__file__).resolve().parents[1]
FAST = ["--quantize", "none", "--dtype", "float32", "--steps", "2", "-W", "64", "-H", "48"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, qwen_tokenizer_dir) -> str:
    root, _ = save_tiny_pipeline(tmp_path_factory.mktemp("cli") / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    return str(root)


def run(*args):
    return CliRunner().invoke(generate, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_png_metadata_round_trips(model, tmp_path):
    out = tmp_path / "cat.png"
    r = ok(run("a cat, 猫", "--seed", 42, "-m", model, "-o", out, "--guidance", 1.5,
               "--negative-prompt", "blurry", *FAST))
    assert r.stdout.strip() == str(out)                   # stdout: only the saved paths
    assert "done: 1 image" in r.output and "peak memory" in r.output and "s/step" in r.output
    with Image.open(out) as im:
        assert im.size == (64, 48)
        im.load()
        text = im.text                                   # what any PNG reader sees
    expected = {"prompt": "a cat, 猫", "negative_prompt": "blurry", "seed": "42", "steps": "2", "guidance": "1.5",
                "size": "64x48", "model": model, "quantization": "none", "dtype": "float32",
                "version": f"zimage-mlx {__version__}"}
    assert {k: text[k] for k in expected} == expected
    assert "Seed: 42" in text["parameters"] and "Negative prompt: blurry" in text["parameters"]
    assert read_png_params(out) == expected

    info = CliRunner().invoke(cli, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert dict(line.split(": ", 1) for line in info.stdout.splitlines()) == expected
    as_json = CliRunner().invoke(cli, ["info", "--json", str(out)])
    assert as_json.exit_code == 0 and '"seed": "42"' in as_json.stdout


def test_info_on_a_foreign_png(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "plain.png")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "no zimage-mlx parameters" in r.output


@pytest.mark.parametrize("args, message", [(["--width", "1000"], "multiple of 16"), (["-H", "50"], "multiple of 16"),
                                           (["--width", "0"], "x>=1"), (["-W", "-16"], "x>=1")])
def test_bad_size_is_one_line_and_exit_2(model, args, message, tmp_path):
    r = run("a cat", "-m", model, *args, "-o", tmp_path / "x.png")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["-o", "{foo}.png"], "{seed} and {index}"),
    (["-o", "out.jpg"], "PNG"),
    (["-s", "1", "-s", "2", "-n", "3"], "2 seeds"),
    (["--strength", "0.5"], "--image"),
    (["--quantize", "3"], "transformer=4"),
    ([], "PROMPT"),
])
def test_other_bad_arguments_exit_2(args, message):
    r = run(*([] if not args else ["a cat"]), *args)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


# the pipeline's rules between parameters (GenerationRequest.check_combinations) in the CLI's words; the model is
# the default hub repository, never fetched: each is refused before the pipeline is built
COMBINATIONS = [
    (["--strength", "0.5"], "--strength needs --image"),
    (["--mask", "{img}"], "--mask needs --image"),
    (["--image", "{img}", "--mask-blur", "4"], "--mask-blur needs --mask"),
    (["--image", "{img}", "--paste-back"], "--paste-back needs --mask"),
    (["--control-type", "canny"], "--control-type needs --control-image"),
    (["--cache-threshold", "0.1"], "--cache-threshold needs --cache"),
    (["--control-image", "{img}"], "--control-image needs --controlnet PATH"),
    (["--controlnet", "cn.safetensors", "--control-image", "{img}", "--image", "{img}"],
     "--image with --control-image needs --mask"),
    (["--controlnet", "cn.safetensors", "--control-image", "{img}", "--control-scale", "1", "--control-scale", "2"],
     "2 --control-scale values for 1 control images"),
    (["--controlnet", "cn.safetensors", "--control-image", "{img}", "--image", "{img}", "--mask", "{img}",
      "--strength", "0.5"], "--strength: ControlNet inpainting starts from pure noise and takes no strength"),
    (["--controlnet", "cn.safetensors"], "--controlnet needs --control-image"),
    (["--control-scale", "0.5"], "--control-scale needs --control-image"),
    (["-s", "1", "-s", "2", "-n", "3"], "--seed: 2 seeds for 3 images"),
]


@pytest.mark.parametrize("args, message", COMBINATIONS, ids=[c[1].split(":")[0][:30] for c in COMBINATIONS])
def test_combination_rules_before_the_pipeline(tmp_path, args, message):
    img = tmp_path / "img.png"
    Image.new("RGB", (64, 48), "white").save(img)
    r = run("a cat", *[a.replace("{img}", str(img)) for a in args], "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and r.output.startswith(f"Error: {message}") and len(r.output.splitlines()) == 1, r.output
    assert list(tmp_path.iterdir()) == [img]


def test_missing_model_is_one_line_exit_1(tmp_path):
    missing = tmp_path / "no-such-model"
    r = run("a cat", "-m", missing, "-o", tmp_path / "x.png", *FAST)
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [r.output.strip()] and r.output.startswith("error: ")
    assert str(missing) in r.output and "Traceback" not in r.output

    r = run("a cat", "-m", missing, "-o", tmp_path / "x.png", "--verbose", *FAST)
    assert r.exit_code == 1
    assert "Traceback (most recent call last)" in r.output and r.output.strip().splitlines()[-1].startswith("error: ")


def test_one_image_per_seed_from_a_template(model, tmp_path):
    r = ok(run("a lighthouse", "-s", 7, "-s", 11, "-m", model, "-o", tmp_path / "lh-{seed}-{index:02d}.png", *FAST))
    names = [tmp_path / "lh-7-00.png", tmp_path / "lh-11-01.png"]
    assert r.stdout.split() == [str(p) for p in names]
    assert [read_png_params(p)["seed"] for p in names] == ["7", "11"]
    a, b = (np.asarray(Image.open(p)) for p in names)
    assert not np.array_equal(a, b)


def test_existing_file_is_never_overwritten(model, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"keep me")
    r = ok(run("a cat", "-s", 1, "-m", model, "-o", out, *FAST))
    assert out.read_bytes() == b"keep me"
    assert r.stdout.strip() == str(tmp_path / "out-1.png")
    assert "out.png exists" in r.output and read_png_params(tmp_path / "out-1.png")["seed"] == "1"


def test_same_seed_reproduces_and_fixed_name_gets_numbered(model, tmp_path):
    # -n 2 with one seed counts up from it; a name without {seed}/{index} gets the seed added, never one file
    r = ok(run("a cat", "-s", 1, "-n", 2, "-m", model, "-o", tmp_path / "cat.png", *FAST))
    paths = [Path(p) for p in r.stdout.split()]
    assert paths == [tmp_path / "cat-1.png", tmp_path / "cat-2.png"]
    assert [read_png_params(p)["seed"] for p in paths] == ["1", "2"]


def test_image_to_image(model, tmp_path):
    src = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "i2i.png"
    r = ok(run("the same, at night", "--image", src, "--strength", 0.5, "-s", 3, "-m", model, "-o", out,
               "--quantize", "none", "--dtype", "float32", "--steps", 4))
    assert "2 steps" in r.output                          # strength 0.5 of 4 steps runs 2
    with Image.open(out) as im:
        assert im.size == (64, 48)                        # the input's size when -W/-H are absent
    params = read_png_params(out)
    assert params["strength"] == "0.5" and params["image"] == str(src) and params["steps"] == "4"


def test_an_rgba_mask_edits_its_transparent_area_as_the_server_does(model, tmp_path):
    """One mask rule for every interface (pipeline/images.py, OpenAI's): a mask with transparency repaints where it
    is transparent. The server's test uses the same kind of mask (test_server_inputs.py)."""
    from zimage_mlx import ZImagePipeline

    rng = np.random.default_rng(4)
    src, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(src)
    alpha = np.full((48, 64), 255, np.uint8)
    alpha[8:40, 16:48] = 0
    Image.fromarray(np.dstack([np.full((48, 64, 3), 255, np.uint8), alpha]), "RGBA").save(mask)   # all white
    ok(run("a window", "--image", src, "--mask", mask, "-s", 5, "-m", model, "-o", out, *FAST))
    pipe = ZImagePipeline.from_pretrained(model, dtype="float32", quantize=None)
    white = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))
    ref = pipe(prompt="a window", image=Image.open(src), mask_image=white, seed=5, height=48, width=64,
               num_inference_steps=2).images[0]
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(ref))


def test_prompt_file_and_random_seed(model, tmp_path):
    prompt = "一只戴着红色围巾的橘猫坐在窗台上\n"
    pf = tmp_path / "prompt.txt"
    pf.write_text(prompt, encoding="utf-8")
    r = ok(run("--prompt-file", pf, "-m", model, "-o", tmp_path / "{seed}.png", *FAST))
    seed = re.search(r"^seed: (\d+)$", r.output, re.M)
    assert seed, r.output
    out = tmp_path / f"{seed.group(1)}.png"
    assert r.stdout.strip() == str(out)
    params = read_png_params(out)
    assert params["seed"] == seed.group(1) and params["prompt"] == prompt.strip()

    both = run("a cat", "--prompt-file", pf)
    assert both.exit_code == 2 and "not both" in both.output


def test_output_directory(model, tmp_path):
    r = ok(run("a cat", "-s", 5, "-m", model, "-o", str(tmp_path) + os.sep, *FAST))
    assert r.stdout.strip() == str(tmp_path / "zimage-5.png")


class _FailingImage:
    """Writes half a PNG, then fails like a full disk or a Ctrl-C would."""

    def __init__(self, exc):
        self.exc = exc

    def save(self, f, **kw):
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 1000)
        raise self.exc


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_no_partial_file(tmp_path, exc):
    with pytest.raises(type(exc)):
        save_png(_FailingImage(exc), tmp_path / "x.png", {"prompt": "p"})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_in_the_cli_leaves_no_partial_file(model, tmp_path, monkeypatch):
    def broken_save(self, fp, *a, **kw):
        fp.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    r = run("a cat", "-s", 1, "-m", model, "-o", tmp_path / "x.png", *FAST)
    assert r.exit_code == 1 and "No space left on device" in r.output.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_save_png_overwrite_and_free_names(tmp_path):
    img = Image.new("RGB", (16, 16), "red")
    p = tmp_path / "a.png"
    assert save_png(img, p, {"prompt": "1"}) == p
    assert save_png(img, p, {"prompt": "2"}) == tmp_path / "a-1.png"
    assert save_png(img, p, {"prompt": "3"}) == tmp_path / "a-2.png"
    assert save_png(img, p, {"prompt": "4"}, overwrite=True) == p
    assert Image.open(p).text["prompt"] == "4"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a-1.png", "a-2.png", "a.png"]


def test_help_via_python_m():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "zimage_mlx.generate", "--help"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: python -m zimage_mlx.generate [OPTIONS] [PROMPT]")
    for opt in ("--prompt-file", "--negative-prompt", "--steps", "--guidance", "--width", "--height", "--seed",
                "--num-images", "--model", "--quantize", "--dtype", "--image", "--strength", "--output",
                "--overwrite", "--verbose", "{seed}", "{index}", "Tongyi-MAI/Z-Image-Turbo", "Exit codes"):
        assert opt in r.stdout, opt


def test_group_help_and_version():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0 and "generate" in r.output and "info" in r.output
    assert __version__ in CliRunner().invoke(cli, ["--version"]).output


@pytest.mark.parametrize("command", ["convert", "generate", "serve"])
def test_ctrl_c_while_a_command_is_importing_is_one_line(command, monkeypatch):
    """Ctrl-C that lands while the command's libraries still import (seconds for MLX and the hub client) ends like
    one that lands later: "interrupted", exit 130, no traceback."""
    import importlib.abc

    name = f"zimage_mlx.apps.{command}_cmd"

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == name:
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 130 and r.output.strip() == "interrupted" and "Traceback" not in r.output, r.output
