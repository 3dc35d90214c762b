"""Data-parallel training under `mlx.launch -n 2` (ring backend, loopback): each process trains on its half of
every global batch and the LoRA gradients are averaged, so the result equals one process with the whole batch."""

from __future__ import annotations

import json

import numpy as np
from make_pipeline import save_tiny_pipeline
from safetensors.numpy import load_file
from test_distributed import _finish, _launch
from test_train_cli import BASE, make_data

from zimage_mlx.apps.train_cmd import main


def test_two_processes_equal_one_with_the_whole_batch(tmp_path, qwen_tokenizer_dir):
    root, _ = save_tiny_pipeline(tmp_path / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    data = make_data(tmp_path / "data", sizes=[(64, 64)] * 4)
    args = [str(data), "--model", str(root), *BASE, "--steps", "3", "--batch-size", "2", "--optimizer", "sgd",
            "--learning-rate", "0.05"]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    code, out, err = _finish(_launch(["-m", "zimage_mlx", "train", *args, "-o", str(tmp_path / "two"),
                                      "--parallel", "data"]))
    assert code == 0, err[-3000:]
    one, two = (load_file(str(tmp_path / d / "lora.safetensors")) for d in ("one", "two"))
    assert set(one) == set(two)
    num = sum(float(np.sum((one[k] - two[k]) ** 2)) for k in one)
    den = sum(float(np.sum(one[k] ** 2)) for k in one)
    moved = [k for k in one if k.endswith("lora_B.weight") and np.abs(one[k]).max() > 0]
    assert moved, "training changed nothing"
    assert (num / den) ** 0.5 <= 1e-5
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["processes"] == 2
    assert (tmp_path / "two" / "loss.csv").read_text().count("\n") == 4    # one writer: header + 3 steps
