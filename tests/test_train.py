"""LoRATrainer against torch: diffusers' ZImageTransformer2DModel with a PEFT LoRA, the loss of diffusers'
examples/dreambooth/train_dreambooth_lora_z_image.py, torch.optim.AdamW / SGD and clip_grad_norm_."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from make_transformer import make_tiny_transformer
from test_transformer import mlx_from_torch

from zimage_mlx import ZImagePipeline
from zimage_mlx.loading.quantize import should_quantize
from zimage_mlx.lora.io import load_peft_lora, save_peft_lora
from zimage_mlx.sampler import (SchedulerConfig, loss_weighting, sample_training_sigmas, timestep_density,
                                train_schedule)
from zimage_mlx.training import LoRATrainer
from zimage_mlx.training.optim import clip_grad_norm

from conftest import rel_err

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3", "adaLN_modulation.0")
RANK, ALPHA = 4, 6.0
SIGMAS = np.array([0.3, 0.8], np.float32)
CAP_LENS = (5, 37)           # padded to 32 and 64: the two samples run as separate groups, as diffusers masks them


def batch(seed=0, h=8, w=6, cap_dim=64):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((2, 16, h, w)).astype(np.float32)
    noise = rng.standard_normal((2, 16, h, w)).astype(np.float32)
    caps = [rng.standard_normal((n, cap_dim)).astype(np.float32) for n in CAP_LENS]
    return x0, noise, caps


def random_init(tm, path, seed=1):
    """A PEFT file with random A and B (B nonzero, so both get gradients) for every target of the tiny model."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, m in tm.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS):
            out_f, in_f = m.weight.shape
            state[name] = (rng.standard_normal((RANK, in_f)).astype(np.float32) / np.sqrt(in_f),
                           0.05 * rng.standard_normal((out_f, RANK)).astype(np.float32))
    save_peft_lora(path, state, RANK, ALPHA)
    return state


def torch_lora_model(tm, state):
    """A PEFT-wrapped copy of the torch transformer with the given A/B."""
    import copy

    from peft import LoraConfig

    model = copy.deepcopy(tm)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(state), init_lora_weights=True))
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in state.items():
            mods[name].lora_A["default"].weight.copy_(torch.from_numpy(a))
            mods[name].lora_B["default"].weight.copy_(torch.from_numpy(b))
    return model, {name: (mods[name].lora_A["default"].weight, mods[name].lora_B["default"].weight)
                   for name in state}


def torch_loss(model, x0, noise, caps, sigmas, weights=None):
    """The training script's loss (float32)."""
    x0, noise, s = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(sigmas)
    xt = (1.0 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
    timesteps = s * 1000.0
    t = (1000.0 - timesteps) / 1000.0
    out = model([x[:, None] for x in xt], t, [torch.from_numpy(c) for c in caps], return_dict=False)[0]
    pred = -torch.stack([o[:, 0] for o in out])
    w = torch.ones_like(s) if weights is None else torch.from_numpy(weights)
    err = (w[:, None, None, None] * (pred.float() - (noise - x0).float()) ** 2).reshape(2, -1)
    return torch.mean(err, 1).mean()


def torch_run(tm, state, x0, noise, caps, optimizer, steps, lr, max_norm, weight_decay=1e-4):
    model, params = torch_lora_model(tm, state)
    flat = [p for ab in params.values() for p in ab]
    opt = torch.optim.SGD(flat, lr=lr) if optimizer == "sgd" else \
        torch.optim.AdamW(flat, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch_loss(model, x0, noise, caps, SIGMAS)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flat, max_norm)
        opt.step()
        losses.append(loss.item())
    return losses, {k: (a.detach().numpy().copy(), b.detach().numpy().copy()) for k, (a, b) in params.items()}


def ours(tm, init_path, bits=None, **kw):
    model = mlx_from_torch(tm)
    if bits:
        nn.quantize(model, group_size=32, bits=bits, class_predicate=lambda p, m: should_quantize(p, m, 32))
    pipe = ZImagePipeline(tokenizer=None, scheduler_config=SchedulerConfig(), transformer=model)
    return LoRATrainer(pipe, init_lora=init_path, targets=TARGETS, **kw)


def change_err(ours_state, ref_state, start) -> float:
    """‖Δours − Δtorch‖ / ‖Δtorch‖ over all A and B together (Δ: change from the start)."""
    d_ours = np.concatenate([(np.array(m) - s).ravel() for k in start for m, s in zip(ours_state[k], start[k])])
    d_ref = np.concatenate([(r - s).ravel() for k in start for r, s in zip(ref_state[k], start[k])])
    return float(np.linalg.norm(d_ours - d_ref) / np.linalg.norm(d_ref))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tm = make_tiny_transformer(3)
    path = tmp_path_factory.mktemp("train") / "init.safetensors"
    return tm, path, random_init(tm, path)


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("shift", [3.0, 6.0])
def test_train_schedule_is_diffusers(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sigmas, timesteps = train_schedule(SchedulerConfig(shift=shift))
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
    assert sigmas[0] == 1.0


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
def test_density_and_weighting_are_diffusers(scheme, monkeypatch):
    from diffusers import training_utils

    rng = np.random.default_rng(0)
    normal, uniform = rng.standard_normal(64).astype(np.float32), rng.uniform(size=64).astype(np.float32)
    monkeypatch.setattr(torch, "normal", lambda mean, std, size, **_: mean + std * torch.from_numpy(normal))
    monkeypatch.setattr(torch, "rand", lambda size, **_: torch.from_numpy(uniform))
    ref = training_utils.compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.0, logit_std=1.0,
                                                               mode_scale=1.29).numpy()
    np.testing.assert_allclose(timestep_density(scheme, normal, uniform), ref, rtol=1e-6, atol=1e-7)
    s = np.linspace(0.01, 1, 64).astype(np.float32)
    ref_w = training_utils.compute_loss_weighting_for_sd3(scheme, torch.from_numpy(s)).numpy()
    np.testing.assert_allclose(loss_weighting(scheme, s), ref_w, rtol=1e-6)


def test_sampled_sigmas_are_on_the_schedule_and_seeded():
    cfg = SchedulerConfig(shift=3.0)
    s1, t1 = sample_training_sigmas(mx.random.key(5), 256, cfg)
    s2, _ = sample_training_sigmas(mx.random.key(5), 256, cfg)
    sigmas, timesteps = train_schedule(cfg)
    np.testing.assert_array_equal(s1, s2)
    assert set(s1.tolist()) <= set(sigmas.tolist()) and len(set(s1.tolist())) > 100
    np.testing.assert_array_equal(t1, timesteps[np.searchsorted(-sigmas, -s1)])


# ------------------------------------------------------------------------------------------------ optimizers
def test_clip_matches_torch():
    rng = np.random.default_rng(0)
    gs = [rng.standard_normal(s).astype(np.float32) for s in ((4, 6), (7,), (3, 3))]
    for max_norm in (0.5, 100.0):
        clipped, norm = clip_grad_norm({"g": [mx.array(g) for g in gs]}, max_norm)
        tg = [torch.from_numpy(g.copy()).requires_grad_() for g in gs]
        for t, g in zip(tg, gs):
            t.grad = torch.from_numpy(g.copy())
        ref_norm = torch.nn.utils.clip_grad_norm_(tg, max_norm)
        assert abs(float(norm) - float(ref_norm)) <= 1e-6 * float(ref_norm)
        for c, t in zip(clipped["g"], tg):
            np.testing.assert_allclose(np.array(c), t.grad.numpy(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ loss and gradients
def test_loss_and_lora_gradients_match_torch(tiny):
    tm, path, state = tiny
    x0, noise, caps = batch()
    trainer = ours(tm, path, optimizer="sgd", learning_rate=1e-3)
    loss, grads = trainer.loss_and_grads(x0, caps, noise, SIGMAS)
    model, params = torch_lora_model(tm, state)
    ref = torch_loss(model, x0, noise, caps, SIGMAS)
    ref.backward()
    assert rel_err(float(loss), ref.item()) <= 1e-5
    named = trainer.named_gradients(grads)
    worst = 0.0
    for name, (a, b) in params.items():
        worst = max(worst, rel_err(named[name][0], a.grad.numpy()), rel_err(named[name][1], b.grad.numpy()))
    assert len(params) == len(state) == 4 * 8 - 1   # 4 blocks; the context refiner has no adaLN
    assert worst <= 1e-4, f"worst LoRA gradient rel err {worst:.2e}"


@pytest.mark.parametrize("optimizer, lr, max_norm, tol", [("sgd", 0.05, 0.05, 1e-4), ("adamw", 1e-3, 0.05, 2e-3)])
def test_three_steps_match_torch(tiny, optimizer, lr, max_norm, tol):
    tm, path, state = tiny
    x0, noise, caps = batch()
    trainer = ours(tm, path, optimizer=optimizer, learning_rate=lr, max_grad_norm=max_norm)
    losses = [trainer.step(x0, caps, noise, SIGMAS) for _ in range(3)]
    ref_losses, ref_state = torch_run(tm, state, x0, noise, caps, optimizer, 3, lr, max_norm)
    err = change_err(trainer.lora_state(), ref_state, state)
    print(f"{optimizer}: LoRA change after 3 steps, rel 2-norm err vs torch {err:.2e}; losses {losses}")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert err <= tol


def test_four_bit_base_matches_torch_on_dequantized_weights(tiny):
    tm, path, state = tiny
    x0, noise, caps = batch()
    trainer = ours(tm, path, bits=4, optimizer="sgd", learning_rate=0.05, max_grad_norm=None)
    # the torch reference gets the dequantized weights of every quantized layer
    deq = {}
    for name, m in trainer.model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            deq[name.removesuffix(".base") + ".weight"] = np.array(mx.dequantize(
                m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits))
    assert len(deq) >= 20
    ref_tm = __import__("copy").deepcopy(tm)
    with torch.no_grad():
        params = dict(ref_tm.named_parameters())
        for k, v in deq.items():
            params[k].copy_(torch.from_numpy(v))
    losses = [trainer.step(x0, caps, noise, SIGMAS) for _ in range(3)]
    ref_losses, ref_state = torch_run(ref_tm, state, x0, noise, caps, "sgd", 3, 0.05, 1e9)
    err = change_err(trainer.lora_state(), ref_state, state)
    print(f"4-bit base: LoRA change after 3 SGD steps, rel err vs torch on dequantized weights {err:.2e}")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert err <= 1e-3


def test_default_init_is_peft(tiny):
    tm, _, _ = tiny
    pipe = ZImagePipeline(tokenizer=None, scheduler_config=SchedulerConfig(), transformer=mlx_from_torch(tm))
    trainer = LoRATrainer(pipe, rank=8, targets=("to_q",))
    st = trainer.lora_state()
    assert sorted(st) == ["context_refiner.0.attention.to_q", "layers.0.attention.to_q",
                          "layers.1.attention.to_q", "noise_refiner.0.attention.to_q"]
    a, b = (np.array(v) for v in st["layers.0.attention.to_q"])
    assert a.shape == (8, 96) and b.shape == (96, 8) and not b.any()
    assert 0 < np.abs(a).max() <= 1 / np.sqrt(96) and a.std() > 0.5 / np.sqrt(3 * 96)


# ------------------------------------------------------------------------------------------------ the saved file
def test_saved_file_header_is_what_diffusers_writes(tiny, tmp_path):
    from diffusers import ZImagePipeline as DiffusersPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    tm, path, state = tiny
    model, _ = torch_lora_model(tm, state)
    DiffusersPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "np") as f:
        ref_meta, ref_keys = f.metadata(), set(f.keys())
        ref_a = f.get_tensor("transformer.layers.0.attention.to_q.lora_A.weight")
    with safe_open(str(path), "np") as f:
        meta, keys = f.metadata(), set(f.keys())
        a = f.get_tensor("transformer.layers.0.attention.to_q.lora_A.weight")
    assert keys == ref_keys and meta["format"] == ref_meta["format"] == "pt"
    np.testing.assert_array_equal(a, ref_a)
    ours_cfg, ref_cfg = json.loads(meta["lora_adapter_metadata"]), json.loads(ref_meta["lora_adapter_metadata"])
    assert set(ours_cfg) <= set(ref_cfg)
    for k in ("transformer.r", "transformer.lora_alpha", "transformer.use_rslora", "transformer.rank_pattern",
              "transformer.alpha_pattern", "transformer.peft_type"):
        assert ours_cfg[k] == ref_cfg[k], k
    # PEFT shortens a long list to suffixes; both name exactly the trained layers
    ref_targets = ref_cfg["transformer.target_modules"]
    assert sorted(ours_cfg["transformer.target_modules"]) == sorted(state)
    assert all(any(n == t or n.endswith("." + t) for t in ref_targets) for n in state)
    state2, rank, alpha = load_peft_lora(path)
    assert (rank, alpha) == (RANK, ALPHA) and set(state2) == set(state)


def test_trained_file_loads_in_diffusers_and_ours_with_the_same_latents(tmp_path, qwen_tokenizer_dir):
    from make_pipeline import diffusers_pipelines, save_tiny_pipeline

    from conftest import to_numpy

    root, models = save_tiny_pipeline(tmp_path / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    t2i, _ = diffusers_pipelines(models, qwen_tokenizer_dir)
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32")
    caps = pipe.encode_prompt(["a photo of sks dog", "sks dog on a beach, golden hour"])
    trainer = LoRATrainer(pipe, rank=4, alpha=8, optimizer="adamw", learning_rate=1e-2, seed=3)
    x0 = np.random.default_rng(0).standard_normal((2, 16, 8, 8)).astype(np.float32)
    for _ in range(2):
        trainer.step(x0, caps)
    path = trainer.save_lora(tmp_path / "my.safetensors")

    lat = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(height=64, width=64, num_inference_steps=3, guidance_scale=0.0, output_type="latent")
    ref_embeds, _ = t2i.encode_prompt(["sks dog"], do_classifier_free_guidance=False)
    base_ref = t2i(prompt_embeds=ref_embeds, latents=lat.clone(), **kw).images.numpy()
    t2i.load_lora_weights(str(path))
    ref = t2i(prompt_embeds=ref_embeds, latents=lat.clone(), **kw).images.numpy()
    fresh = ZImagePipeline.from_pretrained(root, dtype="float32")
    fresh.load_lora_weights(path)
    got = to_numpy(fresh(prompt_embeds=fresh.encode_prompt(["sks dog"]), latents=lat.numpy(), **kw).images)
    moved = float(np.linalg.norm(ref - base_ref) / np.linalg.norm(base_ref))
    print(f"trained LoRA: ours vs diffusers latents rel err {rel_err(got, ref):.2e}; the LoRA moves them {moved:.1%}")
    assert moved > 1e-3
    assert rel_err(got, ref) <= 1e-4


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    from mlx.utils import tree_flatten

    tm, path, _ = tiny
    x0, noise, caps = batch()
    plain = ours(tm, path, optimizer="sgd", learning_rate=1e-3)
    ckpt = ours(tm, path, optimizer="sgd", learning_rate=1e-3, gradient_checkpointing=True)
    assert sum(type(m).__name__ == "CheckpointedBlock" for _, m in ckpt.model.named_modules()) == 4
    (l1, g1), (l2, g2) = (t.loss_and_grads(x0, caps, noise, SIGMAS) for t in (plain, ckpt))
    assert float(l1) == float(l2)
    g2 = dict(tree_flatten(g2))
    for k, v in tree_flatten(g1):   # the chunked attention's backward (float32, its own op order): 1e-5, not bits
        assert rel_err(g2[k], v) <= 1e-5, k


def test_memory_plan_for_training():
    from zimage_mlx.memory import plan_training
    from zimage_mlx.models.transformer import ZImageTransformerConfig

    cfg = vars(ZImageTransformerConfig())
    plain = plan_training(cfg, mx.bfloat16, 4, 1024, 32, checkpointing=False, budget=64e9)
    ckpt = plan_training(cfg, mx.bfloat16, 4, 1024, 32, checkpointing=True, budget=64e9)
    assert ckpt.weights == plain.weights and ckpt.activations < plain.activations / 4
    assert plan_training(cfg, mx.bfloat16, 4, 1024, 32, budget=64e9).gradient_checkpointing is False
    assert plan_training(cfg, mx.bfloat16, 4, 1024, 32, budget=16e9).gradient_checkpointing is True
    assert plan_training(cfg, mx.bfloat16, 8, 1024, 32, budget=64e9).weights > 1.8 * plain.weights
    # chunked attention (training/checkpointing.py) keeps one query chunk's scores: the docs/training.md goals
    for bits, goal in ((4, 8e9), (8, 11e9), (None, 20e9)):
        assert plan_training(cfg, mx.bfloat16, bits, 1024, 32, checkpointing=True, budget=64e9).peak <= goal
    with pytest.raises(ValueError, match=r"training at 1024x1024 needs about .* GB with gradient checkpointing, "
                                         r"6.0 GB available: at most \d+x\d+ fits"):
        plan_training(cfg, mx.bfloat16, 4, 1024, 32, budget=6e9)


@pytest.mark.parametrize("kw, says", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(optimizer="adam"), "optimizer must be one of adamw, sgd"),
    (dict(targets=("nothing_like_this",)), "nothing_like_this"),
    (dict(parallel="tensor"), "parallel must be None or 'data'"),
])
def test_bad_trainer_arguments(tiny, kw, says):
    tm, _, _ = tiny
    pipe = ZImagePipeline(tokenizer=None, scheduler_config=SchedulerConfig(), transformer=mlx_from_torch(tm))
    with pytest.raises(ValueError, match=says):
        LoRATrainer(pipe, **kw)


def test_step_draws_seeded_noise_and_sigmas(tiny):
    tm, path, _ = tiny
    x0, _, caps = batch()
    a, b = (ours(tm, path, optimizer="sgd", learning_rate=1e-2, seed=7) for _ in range(2))
    assert [a.step(x0, caps) for _ in range(2)] == [b.step(x0, caps) for _ in range(2)]
    with pytest.raises(ValueError, match="pass both noise and sigmas"):
        a.step(x0, caps, noise=np.zeros_like(x0))


def test_fused_projections_train_as_the_separate_layers(tiny):
    """On a model whose q/k/v and w1/w3 run as one matmul (the GPU default), a LoRA on to_q is a row slice of
    to_qkv: the loss and gradients are those of the separate layers."""
    from zimage_mlx.models.fused_projections import fuse_projections

    tm, path, _ = tiny
    x0, noise, caps = batch()
    plain = ours(tm, path, optimizer="sgd", learning_rate=1e-3)
    model = mlx_from_torch(tm)
    assert fuse_projections(model) == 8
    pipe = ZImagePipeline(tokenizer=None, scheduler_config=SchedulerConfig(), transformer=model)
    fused = LoRATrainer(pipe, init_lora=path, targets=TARGETS, optimizer="sgd", learning_rate=1e-3)
    (l1, g1), (l2, g2) = (t.loss_and_grads(x0, caps, noise, SIGMAS) for t in (plain, fused))
    assert rel_err(float(l2), float(l1)) <= 1e-6
    n1, n2 = plain.named_gradients(g1), fused.named_gradients(g2)
    assert set(n1) == set(n2)
    for k in n1:
        for a, b in zip(n2[k], n1[k]):
            assert rel_err(a, b) <= 1e-4, k
