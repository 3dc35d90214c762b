"""The catalogue of bad inputs: each one gives one clear line (CLI: exit code 2 for bad arguments, 1 for runtime
refusals; nothing written, nothing lost) or one exception naming the argument (Python API). New features add their
rows here."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from make_pipeline import save_tiny_pipeline

from zimage_mlx import LoRAError, WeightError, ZImagePipeline
from zimage_mlx.apps.cli import cli
from zimage_mlx.loading.weights import read_safetensors

FAST = ["--quantize", "none", "--dtype", "float32", "--steps", "1", "-W", "32", "-H", "32"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    root, _ = save_tiny_pipeline(tmp_path_factory.mktemp("bad") / "my-model", qwen_tokenizer_dir)
    return root


@pytest.fixture(scope="module")
def pipe(model):
    return ZImagePipeline.from_pretrained(model, dtype="float32", keep_text_encoder=True)


@pytest.fixture()
def files(tmp_path):
    """Inputs the CLI rows refer to: a 1x1 image, a normal image, a prompt file in Latin-1, a regular file."""
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9".encode("latin-1"))
    (tmp_path / "plain").write_text("a file, not a folder")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    Image.new("L", (64, 32), 255).save(tmp_path / "wide.png")
    return tmp_path


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory) -> Path:
    from make_controlnet import make_tiny_controlnet, save_tiny_controlnet

    return save_tiny_controlnet(tmp_path_factory.mktemp("cn") / "controlnet-2.1", make_tiny_controlnet(1, "2.1"))


# (CLI arguments with {model} and {tmp} filled in, exit code, fragment of the one line printed)
CLI_CASES = [
    ("generate a-cat -m {model} -W 100000 -H 16", 2, "position range"),
    ("generate a-cat -m {model} -q none -W 8192 -H 8192", 1, "largest square image that fits"),
    ("generate a-cat -m {model} -q auto -W 16384 -H 16384", 1, "largest square image that fits"),
    ("generate a-cat -m {model} -W 1000", 2, "multiple of 16"),
    ("generate a-cat -m {model} -o /proc/zimage-test.png", 2, "cannot write images"),
    ("generate a-cat -m {model} -o {tmp}/plain/x.png", 2, "is not a folder"),
    ("generate -m {model} --prompt-file {tmp}/latin1.txt", 2, "byte offset 5"),
    ("generate a-cat -m {model} --seed 18446744073709551616", 2, "--seed"),
    ("generate a-cat -m {model} --seed 18446744073709551615 -n 2", 2, "--seed"),
    ("generate a-cat -m {model} --image {tmp}/red.png --strength 0", 2, "--strength"),
    ("generate a-cat -m {model} --guidance nan", 2, "nan"),
    ("generate a-cat -m {model} --parallel pipeline", 2, "--parallel"),
    ("generate a-cat -m {model} --cfg-truncation nan", 2, "nan"),
    ("generate a-cat -m {model} --image {tmp}/dot.png", 2, "1x1 pixels"),
    ("generate a-cat -m {model} -q 3", 2, "transformer=4"),
    ("generate a-cat -m {model} -q transfomer=4", 2, "unknown model"),
    ("generate a-cat -m {model} --steps 0", 2, "--steps"),
    ("generate a-cat -m {model} --preview {tmp}/plain/live.png", 2, "is not a folder"),
    ("generate a-cat -m {model} --taef1 {tmp}/red.png", 1, "must be a .safetensors file"),
    ("generate a-cat -m {model} --lora {tmp}/missing.safetensors", 2, "no such file"),
    ("generate a-cat -m {model} --lora {tmp}/red.png:0.5", 1, "red.png: not a safetensors file"),
    ("generate a-cat -m {model} --lora {tmp}/plain:inf", 2, "finite number"),
    ("serve -m {model} --lora {tmp}/missing.safetensors", 2, "no such file"),
    ("serve -m {model} --port 70000", 2, "--port"),
    ("serve -m {model} --max-queue 0", 2, "--max-queue"),
    ("serve -m {model} -q 3", 2, "transformer=4"),
    ("convert {model} -o .", 2, "current directory"),
    ("convert {model} -o {tmp}/mine --overwrite", 2, "not a zimage_mlx conversion"),
    ("convert {model} -o {tmp}/mine", 2, "--overwrite"),
    ("convert {model} -o {tmp}/out --transformer {tmp}/red.png", 2, "not both"),
    ("convert {model} -o {tmp}/out -q auto", 2, "load time"),
    ("convert {model}", 2, "--output"),
    ("convert -o {tmp}/out --vae {tmp}/red.png", 2, "--transformer, --text-encoder too"),
    ("generate a-cat -m {model} --mask {tmp}/red.png", 2, "--mask needs --image"),
    ("generate a-cat -m {model} --image {tmp}/red.png --paste-back", 2, "--paste-back needs --mask"),
    ("generate a-cat -m {model} --control-image {tmp}/red.png", 2, "--control-image needs --controlnet"),
    ("generate a-cat -m {model} --control-scale 0.5", 2, "--control-scale needs --control-image"),
    ("generate a-cat -m {model} --controlnet {model}/transformer --control-image {tmp}/red.png", 1,
     "not a ControlNet directory"),
    ("generate a-cat -m {model} --controlnet {tmp}/red.png --control-image {tmp}/red.png", 1, "safetensors"),
    ("convert -o {tmp}/out --controlnet {model}/vae/diffusion_pytorch_model.safetensors", 1,
     "given as a ControlNet, but it holds a FLUX 16-channel VAE"),
    ("convert {model} -o {tmp}/out --controlnet {tmp}/red.png", 2, "converts a ControlNet alone"),
    # checked from the arguments and files before the pipeline is built (exit 2, no plan line)
    ("generate a-cat -m {model} --controlnet {cn} --control-image {tmp}/red.png --control-scale nan", 2,
     "finite number, got nan"),
    ("generate a-cat -m {model} --controlnet {cn} --control-image {tmp}/red.png --control-scale inf", 2,
     "finite number, got inf"),
    ("generate a-cat -m {model} --image {tmp}/red.png --mask {tmp}/plain", 2, "--mask"),
    ("generate a-cat -m {model} --image {tmp}/red.png --mask {tmp}/wide.png", 2, "aspect ratio"),
    ("generate a-cat -m {model} --controlnet {cn}", 2, "--controlnet needs --control-image"),
    ("generate a-cat -m {model} --controlnet {cn} --control-image {tmp}/dot.png -W 32 -H 32", 2, "1x1 pixels"),
    ("generate a-cat -m {model} --controlnet {cn} --control-image {tmp}/red.png --control-image {tmp}/dot.png", 2,
     "1x1 pixels"),
]


@pytest.mark.parametrize("line, code, message", CLI_CASES, ids=[c[0].split(" -m ")[-1][:40] for c in CLI_CASES])
def test_cli_bad_input(model, files, controlnet, line, code, message, monkeypatch):
    monkeypatch.chdir(files)
    before = sorted(p.relative_to(files) for p in files.rglob("*"))
    args = [a.replace("{model}", str(model)).replace("{tmp}", str(files)).replace("{cn}", str(controlnet))
            .replace("a-cat", "a cat") for a in line.split()]
    r = CliRunner().invoke(cli, args)
    lines = r.output.strip().splitlines()
    assert r.exit_code == code, r.output
    assert message in lines[-1], r.output
    assert len([ln for ln in lines if "rror" in ln]) == 1 and "Traceback" not in r.output, r.output
    if code == 2 and line.startswith("generate"):
        assert "Z-Image" not in r.output, r.output      # refused before the plan line (no weight was read)
    assert sorted(p.relative_to(files) for p in files.rglob("*")) == before, "something was written or removed"


def test_invalid_utf8_prompt_argument(model, tmp_path):
    proc = subprocess.run([os.fsencode(sys.executable), b"-m", b"zimage_mlx.generate", b"a \xff cat", b"-m",
                           os.fsencode(model), b"-o", os.fsencode(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not valid UTF-8 (byte offset 2)" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_several_images_never_share_a_file(model, tmp_path):
    r = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(model), "-n", "3", "-s", "5", "-o",
                                 str(tmp_path / "x.png"), "--overwrite", *FAST])
    assert r.exit_code == 0, r.output
    assert r.stdout.split() == [str(tmp_path / f"x-{s}.png") for s in (5, 6, 7)]
    assert len({(tmp_path / f"x-{s}.png").read_bytes() for s in (5, 6, 7)}) == 3


def test_failed_save_falls_back_to_the_current_folder(model, tmp_path, monkeypatch):
    import zimage_mlx.apps.outputs as cli_mod

    real = cli_mod.save_png
    dest = tmp_path / "dest"

    def save(image, path, params, overwrite=False):
        if path.parent == dest:
            raise OSError(28, "No space left on device")
        return real(image, path, params, overwrite)

    monkeypatch.setattr(cli_mod, "save_png", save)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    r = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(model), "-s", "1", "-o", str(dest / "x.png"), *FAST])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(work / "x.png") and (work / "x.png").is_file()
    assert "No space left on device" in r.output and "saved the image as" in r.output


def test_png_files_honour_the_umask(model, tmp_path):
    old = os.umask(0o022)
    try:
        r = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(model), "-s", "1", "-o", str(tmp_path / "x.png"),
                                     *FAST])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o644


def test_turbo_detected_without_the_name(model, pipe):
    """diffusers writes "siglip_feat_dim": null into every transformer config; the folder is called my-model."""
    import json

    assert "siglip_feat_dim" in json.loads((model / "transformer" / "config.json").read_text())
    assert "turbo" not in str(model).lower() and pipe.variant == "turbo"
    r = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(model), "-o", str(model.parent / "t.png"), *FAST])
    assert "Z-Image Turbo (1 steps, guidance 0)" in r.output, r.output


def test_broken_shard_is_reported_before_any_compute(model, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    shard = sorted((broken / "transformer").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(WeightError, match=f"{shard.name}.*truncated"):
        ZImagePipeline.from_pretrained(broken, dtype="float32")


def _header_file(path: Path, header: bytes) -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path


@pytest.mark.parametrize("header", [b'{"w": 5}', b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": "x"}}'])
def test_safetensors_header_of_the_wrong_shape(tmp_path, header):
    path = _header_file(tmp_path / "odd.safetensors", header)
    with pytest.raises(WeightError, match="odd.safetensors.*corrupt safetensors header"):
        read_safetensors(path)


# (what is called, exception, fragment of its message)
API_CASES = [
    (lambda p, m: p(prompt="x", height=0, width=64), ValueError, "height must be at least 1"),
    (lambda p, m: p(prompt="x", height=48, width=50), ValueError, "width must be a positive multiple of 16"),
    (lambda p, m: p(prompt=123), ValueError, "prompt must be a string or a list of strings, got int"),
    (lambda p, m: p(prompt=[]), ValueError, "prompt is an empty list"),
    (lambda p, m: p(prompt="x", seed=-1), ValueError, "seed must be between 0"),
    (lambda p, m: p(prompt="x", seed="12"), ValueError, "seed must be an integer"),
    (lambda p, m: p(prompt="x", seed=2**64), ValueError, "seed must be between 0"),
    (lambda p, m: p(prompt="x", guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number"),
    (lambda p, m: p(prompt="x", num_inference_steps=0), ValueError, "num_inference_steps must be between 1"),
    (lambda p, m: p(prompt="x", num_images_per_prompt=0), ValueError, "num_images_per_prompt must be at least 1"),
    (lambda p, m: p(prompt="x", strength=0.5), ValueError, "strength needs an image"),
    (lambda p, m: p(prompt="x", image=np.zeros((32, 32, 3), np.uint8), strength=1.5), ValueError, "strength must be"),
    (lambda p, m: p(prompt="x", image=np.zeros((32, 32, 3), np.uint8), strength=0.0), ValueError, "leaves no step"),
    (lambda p, m: p(prompt="x", image=Image.new("RGB", (1, 1))), ValueError, "1x1 pixels"),
    (lambda p, m: p(prompt="x", image=3.5), ValueError, "image must be a PIL image"),
    (lambda p, m: p(prompt="x", output_type="jpg"), ValueError, "output_type"),
    (lambda p, m: p(prompt="x", height=100000, width=32), ValueError, "position range"),
    (lambda p, m: p(prompt="x", height=8192, width=8192), MemoryError, "largest square image that fits"),
    (lambda p, m: ZImagePipeline.from_pretrained(m, quantize=3), ValueError, "auto, none, 4, 8"),
    (lambda p, m: ZImagePipeline.from_pretrained(m, quantize={"transformer": 5}), ValueError, "bits must be 4, 8"),
    (lambda p, m: ZImagePipeline.from_pretrained(m, quantize={"transfomer": 4}), ValueError, "unknown model"),
    (lambda p, m: ZImagePipeline.from_pretrained(m, variant="xl"), ValueError, "variant must be one of"),
    (lambda p, m: ZImagePipeline.from_pretrained(m, dtype="float64"), ValueError, "unknown dtype"),
    (lambda p, m: ZImagePipeline.from_pretrained(m, dtype=mx.float16), ValueError, "float16 is not supported"),
    (lambda p, m: ZImagePipeline.from_pretrained(m / "nope"), WeightError, "no such directory"),
    (lambda p, m: p(prompt="x", mask_image=np.zeros((32, 32), np.uint8)), ValueError, "mask_image needs image"),
    (lambda p, m: p(prompt="x", image=Image.new("RGB", (32, 32)), mask_image=Image.new("L", (16, 32))), ValueError,
     "mask_image is 16x32 but the image is 32x32"),
    (lambda p, m: p(prompt="x", image=Image.new("RGB", (32, 32)), mask_image=Image.new("L", (32, 32)), mask_blur=-1),
     ValueError, "mask_blur must be between 0.0"),
    (lambda p, m: p(prompt="x", control_image=Image.new("RGB", (32, 32))), ValueError, "no ControlNet: load one"),
    (lambda p, m: p.load_controlnet(m / "vae"), WeightError, "not a ControlNet directory"),
    (lambda p, m: p.load_controlnet(m / "none.safetensors"), WeightError, "none.safetensors: file not found"),
    (lambda p, m: ZImagePipeline.from_pretrained(m, controlnet_semantics="comfy"), ValueError,
     "controlnet_semantics must be one of"),
    (lambda p, m: ZImagePipeline.from_pretrained(m, parallel="pipeline"), ValueError, "parallel must be one of"),
    (lambda p, m: p.load_lora_weights(m / "nope.safetensors"), LoRAError, "LoRA file not found"),
    (lambda p, m: p.load_lora_weights({"double_blocks.0.img_attn.qkv.lora_A.weight": np.zeros((4, 64), np.float32)}),
     LoRAError, "for FLUX"),
    (lambda p, m: p.set_adapters(["nope"]), ValueError, "no adapter named 'nope'"),
    (lambda p, m: p.set_adapters(["nope"], [1.0, 2.0]), ValueError, "2 adapter weights for 1 adapters"),
]


@pytest.mark.parametrize("call, exc, message", API_CASES, ids=[str(i) for i in range(len(API_CASES))])
def test_api_bad_input(pipe, model, call, exc, message):
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(pipe, model)
