"""`zimage-mlx train` on a tiny random checkpoint: outputs, resume == straight run, Ctrl-C, the training adapter,
and every bad input (one clear line; exit 2 for arguments, 1 at run time; nothing already written lost)."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from make_pipeline import save_tiny_pipeline
from PIL import Image
from safetensors.numpy import load_file

from zimage_mlx.apps.train_cmd import main
from zimage_mlx.lora.io import save_peft_lora
from zimage_mlx.training.dataset import epoch_batches, make_buckets, nearest_bucket

BASE = ["--training-adapter", "none", "--resolution", "32", "--dtype", "float32", "--rank", "4", "--quiet"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, qwen_tokenizer_dir):
    root, _ = save_tiny_pipeline(tmp_path_factory.mktemp("train_cli") / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    return root


def make_data(folder, sizes=((64, 48), (48, 64), (64, 64)), captions=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a photo of sks {i}")
    return folder


def run(model, data, out, *extra):
    return main([str(data), "-o", str(out), "--model", str(model), *BASE, *extra])


def test_outputs_and_resume_equals_a_straight_run(model, tmp_path, capsys):
    data = make_data(tmp_path / "data")
    assert run(model, data, tmp_path / "straight", "--steps", "4", "--save-every", "2",
               "--validation-prompt", "sks dog", "--validate-every", "2", "--validation-steps", "2") == 0
    out = tmp_path / "straight"
    for name in ("lora.safetensors", "loss.csv", "loss.png", "train_config.json", "samples/step-2-0.png",
                 "samples/step-4-0.png", "checkpoints/step-2/lora.safetensors", "checkpoints/step-4/state.json"):
        assert (out / name).is_file(), name
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,seconds" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    config = json.loads((out / "train_config.json").read_text())
    assert config["args"]["steps"] == 4 and len(config["data"]) == 3 and config["identity"]["rank"] == 4
    straight = load_file(str(out / "lora.safetensors"))
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in straight)

    part = tmp_path / "resumed"
    assert run(model, data, part, "--steps", "2", "--save-every", "2") == 0
    assert run(model, data, part, "--steps", "4", "--save-every", "2", "--resume") == 0
    resumed = load_file(str(part / "lora.safetensors"))
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k])
    assert (part / "loss.csv").read_text().splitlines()[1:] != [] and \
        [r.split(",")[1] for r in (part / "loss.csv").read_text().splitlines()[1:]] == \
        [r.split(",")[1] for r in rows[1:]]


def test_ctrl_c_writes_a_checkpoint_and_says_how_to_resume(model, tmp_path, capsys, monkeypatch):
    from zimage_mlx.apps import train_loop

    data = make_data(tmp_path / "data")
    real = train_loop.TrainingRun._one_step
    calls = []

    def interrupted(self):      # Ctrl-C arrives during the second step: it finishes, then the run stops
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(train_loop.TrainingRun, "_one_step", interrupted)
    assert run(model, data, tmp_path / "out", "--steps", "10", "--save-every", "100") == 130
    err = capsys.readouterr().err
    assert "stopping after this step" in err and "--resume" in err and "step 2" in err and len(calls) == 2
    assert (tmp_path / "out" / "checkpoints" / "step-2" / "state.json").is_file()
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_training_adapter_is_applied_but_never_saved(model, tmp_path):
    from zimage_mlx import ZImagePipeline

    data = make_data(tmp_path / "data")
    pipe = ZImagePipeline.from_pretrained(model, dtype="float32")
    rng = np.random.default_rng(1)
    adapter = {}
    for name in ("layers.0.attention.to_q", "layers.1.feed_forward.w2"):
        lin = pipe.transformer
        for p in name.split("."):
            lin = lin[int(p)] if p.isdigit() else getattr(lin, p)
        out_f, in_f = lin.weight.shape
        adapter[name] = (rng.standard_normal((2, in_f)).astype(np.float32), rng.standard_normal((out_f, 2)).astype(np.float32))
    save_peft_lora(tmp_path / "adapter.safetensors", adapter, 2, 2.0)
    assert main([str(data), "-o", str(tmp_path / "with"), "--model", str(model), *BASE[2:], "--steps", "2",
                 "--training-adapter", str(tmp_path / "adapter.safetensors")]) == 0
    assert run(model, data, tmp_path / "without", "--steps", "2") == 0
    with_, without = (load_file(str(tmp_path / d / "lora.safetensors")) for d in ("with", "without"))
    assert set(with_) == set(without)                 # the adapter's own tensors are not in the output
    loss = [(tmp_path / d / "loss.csv").read_text().splitlines()[1] for d in ("with", "without")]
    assert loss[0] != loss[1]                         # ... but it took part in training


def test_turbo_adapter_offline_is_one_line(model, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    data = make_data(tmp_path / "data")
    code = main([str(data), "-o", str(tmp_path / "out"), "--model", str(model), *BASE[2:], "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "hf download ostris/zimage_turbo_training_adapter" in err[-1]
    assert "--training-adapter none" in err[-1]


# ------------------------------------------------------------------------------------------------ bad input
def _bad(tmp_path, kind):
    data = tmp_path / "data"
    if kind == "empty":
        data.mkdir()
    elif kind == "no images":
        data.mkdir()
        (data / "notes.txt").write_text("hello")
    elif kind == "no captions":
        make_data(data, captions=False)
    elif kind == "not utf-8":
        make_data(data)
        (data / "img1.txt").write_bytes(b"caf\xe9 au lait")
    elif kind == "all corrupt":
        data.mkdir()
        (data / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
        (data / "a.txt").write_text("x")
    return data


@pytest.mark.parametrize("kind, code, says", [
    ("empty", 1, "the folder is empty"),
    ("no images", 1, "no images"),
    ("no captions", 1, "3 image(s) have no caption (.txt next to them): img0.png, img1.png, img2.png"),
    ("not utf-8", 1, "img1.txt: caption is not UTF-8 (invalid byte 0xe9 at offset 3)"),
    ("all corrupt", 1, "no usable images left"),
])
def test_bad_data(model, tmp_path, capsys, kind, code, says):
    data = _bad(tmp_path, kind)
    assert run(model, data, tmp_path / "out", "--steps", "1") == code
    err = capsys.readouterr().err
    assert says in err, err


@pytest.mark.parametrize("args, says", [
    (["--resolution", "50"], "--resolution must be a positive multiple of 16, got 50 (try 48)"),
    (["--rank", "0"], "--rank must be a positive integer, got 0"),
    (["--resume"], "--resume: nothing to resume"),
    (["--learning-rate", "-1"], "--learning-rate must be > 0"),
])
def test_bad_arguments_exit_2(model, tmp_path, capsys, args, says):
    data = make_data(tmp_path / "data")
    with pytest.raises(SystemExit) as e:
        run(model, data, tmp_path / "out", "--steps", "1", *args)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_output_not_writable(model, tmp_path, capsys):
    data = make_data(tmp_path / "data")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        run(model, data, tmp_path / "file" / "out", "--steps", "1")
    assert e.value.code == 2 and "--output" in capsys.readouterr().err


def test_resume_from_another_rank_is_refused_and_keeps_the_checkpoint(model, tmp_path, capsys):
    data = make_data(tmp_path / "data")
    assert run(model, data, tmp_path / "out", "--steps", "1") == 0
    before = (tmp_path / "out" / "checkpoints" / "step-1" / "optimizer.safetensors").read_bytes()
    assert main([str(data), "-o", str(tmp_path / "out"), "--model", str(model), *BASE[:-3], "--rank", "8",
                 "--quiet", "--steps", "2", "--resume"]) == 2
    assert "was made with rank 4, this run uses 8" in capsys.readouterr().err
    assert (tmp_path / "out" / "checkpoints" / "step-1" / "optimizer.safetensors").read_bytes() == before


def test_odd_images_are_converted_or_skipped_with_warnings(model, tmp_path, capsys):
    data = make_data(tmp_path / "data")
    Image.new("CMYK", (64, 64), (10, 20, 30, 0)).save(data / "cmyk.jpg")
    Image.new("RGBA", (64, 64), (10, 20, 30, 128)).save(data / "rgba.png")
    Image.new("I;16", (64, 64)).save(data / "deep.png")
    Image.new("RGB", (8, 8)).save(data / "tiny.png")
    (data / "cut.png").write_bytes((data / "img0.png").read_bytes()[:60])
    for stem in ("cmyk", "rgba", "deep", "tiny", "cut"):
        (data / f"{stem}.txt").write_text("x")
    with pytest.warns(UserWarning) as record:
        assert run(model, data, tmp_path / "out", "--steps", "1") == 0
    said = " | ".join(str(w.message) for w in record)
    assert "CMYK images are converted" in said and "transparent images" in said and "16-bit" in said
    assert "skipping tiny.png" in said and "cut.png" in said


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(model, tmp_path, capsys, monkeypatch):
    from zimage_mlx.training import checkpoints

    data = make_data(tmp_path / "data")
    assert run(model, data, tmp_path / "out", "--steps", "1") == 0
    real = checkpoints.mx.save_safetensors

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.mx, "save_safetensors", full)
    assert run(model, data, tmp_path / "out", "--steps", "2", "--resume") == 1
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.setattr(checkpoints.mx, "save_safetensors", real)
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-1"]
    assert run(model, data, tmp_path / "out", "--steps", "2", "--resume") == 0


# ------------------------------------------------------------------------------------------------ data pieces
def test_buckets_and_order():
    buckets = make_buckets(1024)
    assert (1024, 1024) in buckets and all(w % 16 == 0 and h % 16 == 0 and w * h <= 1024 ** 2 for w, h in buckets)
    assert nearest_bucket((1920, 1080), buckets)[0] > nearest_bucket((1920, 1080), buckets)[1]
    with pytest.raises(ValueError, match="multiple of 16"):
        make_buckets(1000)

    class S:
        def __init__(self, b):
            self.bucket, self.item = b, type("I", (), {"repeats": 1})()

    samples = [S((32, 32))] * 5 + [S((48, 16))] * 3
    a, b = epoch_batches(samples, 2, 0, 0), epoch_batches(samples, 2, 0, 0)
    assert a == b and a != epoch_batches(samples, 2, 0, 1)
    assert all(len({samples[i].bucket for i in batch}) == 1 and len(batch) == 2 for batch in a)


def test_a_run_that_cannot_fit_is_refused_before_loading(model, tmp_path, capsys, monkeypatch):
    from zimage_mlx import memory

    data = make_data(tmp_path / "data")
    monkeypatch.setattr(memory, "machine_memory_bytes", lambda: (100_000_000, "test"))
    assert run(model, data, tmp_path / "out", "--steps", "1") == 2
    err = capsys.readouterr().err
    assert "training at 32x32 needs about" in err and "GB available" in err
    assert not (tmp_path / "out" / "cache").exists()


def test_config_file_and_gradient_accumulation(model, tmp_path):
    data = make_data(tmp_path / "data")
    (tmp_path / "train.toml").write_text('steps = 2\ngrad-accum = 2\nlearning_rate = 0.001\nseed = 5\n')
    assert run(model, data, tmp_path / "out", "--config", str(tmp_path / "train.toml"), "--seed", "6") == 0
    args = json.loads((tmp_path / "out" / "train_config.json").read_text())["args"]
    assert (args["steps"], args["grad_accum"], args["learning_rate"], args["seed"]) == (2, 2, 0.001, 6)
    assert (tmp_path / "out" / "loss.csv").read_text().count("\n") == 3
    (tmp_path / "bad.toml").write_text('stepz = 2\n')
    with pytest.raises(SystemExit) as e:
        run(model, data, tmp_path / "out2", "--config", str(tmp_path / "bad.toml"))
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------------ the click command
def _parsed(monkeypatch, argv):
    """The options the run would get (the run itself replaced)."""
    from zimage_mlx.apps import train_cmd

    seen = []
    monkeypatch.setattr(train_cmd, "run_training", lambda args: seen.append(args) or 0)
    assert main(argv) == 0
    return seen[0]


def test_config_precedence_command_line_then_file_then_defaults(tmp_path, monkeypatch):
    data = make_data(tmp_path / "data")
    (tmp_path / "t.toml").write_text('seed = 5\nrank = 8\ntargets = ["to_q", "to_v"]\nvalidation-prompt = "a dog"\n'
                                     'weighting_scheme = "cosmap"\n')
    a = _parsed(monkeypatch, [str(data), "-o", str(tmp_path / "out"), "--config", str(tmp_path / "t.toml"),
                              "--seed", "0", "--targets", "w1,w2", "--targets", "w3"])
    assert (a.seed, a.rank, a.targets, a.validation_prompt, a.weighting_scheme) == \
        (0, 8, ["w1", "w2", "w3"], ["a dog"], "cosmap")      # --seed 0 is the default, and given: it wins
    assert (a.steps, a.learning_rate, a.quantize, a.training_adapter) == (1000, 1e-4, "none", None)
    a = _parsed(monkeypatch, [str(data), "-o", str(tmp_path / "out")])
    assert a.targets == ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"] and a.validation_prompt == []


@pytest.mark.parametrize("toml, says", [
    ("rank = 0\n", "--rank must be a positive integer, got 0"),
    ("steps = \"many\"\n", "'many' is not a valid integer"),
    ("optimizer = \"lion\"\n", "'lion' is not one of 'adamw', 'sgd'"),
    ("config = \"other.toml\"\n", "unknown option 'config'"),
    ("steps = [\n", "t.toml"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, toml, says):
    data = make_data(tmp_path / "data")
    (tmp_path / "t.toml").write_text(toml)
    with pytest.raises(SystemExit) as e:
        main([str(data), "-o", str(tmp_path / "out"), "--config", str(tmp_path / "t.toml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("Error: ") and says in err[0], err


def test_help_lists_every_option_and_the_group_runs_it(tmp_path):
    from click.testing import CliRunner

    from zimage_mlx.apps.cli import cli
    from zimage_mlx.apps.train_cmd import train

    r = CliRunner().invoke(cli, ["train", "--help"])
    assert r.exit_code == 0
    for param in train.params:
        for opt in param.opts:
            assert opt in r.output if opt.startswith("-") else opt.upper() in r.output, opt
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "missing"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [f"Error: DATA {tmp_path / 'missing'}: not a folder"]
    r = CliRunner().invoke(cli, ["train", str(tmp_path)])
    assert r.exit_code == 2 and "Missing option '--output'" in r.output and len(r.output.splitlines()) == 1
