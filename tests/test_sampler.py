"""The schedule must be bit-identical to diffusers' for every N; the update and CFG match torch's float32 math."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

from zimage_mlx import sampler


def _diffusers_schedule(n, cfg: dict, image_seq_len=4096):
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    c = sched.config
    mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    sched.set_timesteps(n, sigmas=get_default_z_image_sigmas(n), mu=mu)
    return sched, sched.sigmas.numpy(), sched.timesteps.numpy()


@pytest.mark.parametrize("cfg", [
    {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0},   # Turbo
    {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 6.0},   # Base
    {"num_train_timesteps": 1000, "use_dynamic_shifting": True, "shift": 3.0},
    {"num_train_timesteps": 1000, "use_dynamic_shifting": True, "time_shift_type": "linear"},
])
def test_sigmas_and_timesteps_identical_for_every_n(cfg):
    ours_cfg = sampler.SchedulerConfig.from_dict(cfg)
    for n in range(1, 51):
        _, ref_sigmas, ref_t = _diffusers_schedule(n, cfg, image_seq_len=1024)
        sig = sampler.sigmas_for(n, ours_cfg, image_seq_len=1024)
        np.testing.assert_array_equal(sig, ref_sigmas, err_msg=f"N={n}")
        np.testing.assert_array_equal(sampler.timesteps_for(sig, ours_cfg), ref_t, err_msg=f"N={n}")
        ref_model_t = ((1000 - torch.from_numpy(ref_t)) / 1000).numpy()
        ours_model_t = np.array([sampler.model_time(t, ours_cfg) for t in sampler.timesteps_for(sig, ours_cfg)])
        np.testing.assert_array_equal(ours_model_t, ref_model_t, err_msg=f"N={n}")


def test_turbo_schedule_values():
    sig = sampler.sigmas_for(8, sampler.SchedulerConfig(shift=3.0))
    np.testing.assert_allclose(sig, [1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0], atol=1e-6)


def test_euler_step_matches_scheduler():
    cfg = {"num_train_timesteps": 1000, "shift": 3.0}
    sched, sigmas, timesteps = _diffusers_schedule(8, cfg)
    sched.set_begin_index(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 4, 6)).astype(np.float32)
    xm = mx.array(x)
    for i, t in enumerate(timesteps):
        v = rng.standard_normal(x.shape).astype(np.float32)
        x = sched.step(-torch.from_numpy(v), torch.tensor(t), torch.from_numpy(x), return_dict=False)[0].numpy()
        xm = sampler.euler_step(xm, mx.array(v), sigmas[i], sigmas[i + 1])
        np.testing.assert_allclose(np.array(xm), x, rtol=0, atol=1e-6)


def test_guidance_and_normalization_match_torch():
    rng = np.random.default_rng(1)
    pos, neg = (rng.standard_normal((2, 16, 4, 4)).astype(np.float32) for _ in range(2))
    for scale, norm in [(4.0, False), (4.0, 1.0), (2.5, 0.7)]:
        ours = np.array(sampler.guidance(mx.array(pos), mx.array(neg), scale, norm))
        for j in range(2):
            p, n = torch.from_numpy(pos[j]), torch.from_numpy(neg[j])
            pred = p + scale * (p - n)
            if norm and float(norm) > 0:
                limit = torch.linalg.vector_norm(p) * float(norm)
                if torch.linalg.vector_norm(pred) > limit:
                    pred = pred * (limit / torch.linalg.vector_norm(pred))
            np.testing.assert_allclose(ours[j], pred.numpy(), rtol=1e-5, atol=1e-5)


def test_cfg_truncation_and_img2img_start():
    assert sampler.guidance_for_step(4.0, 0.5, 1.0) == 4.0
    assert sampler.guidance_for_step(4.0, 0.5, 0.4) == 0.0
    assert sampler.guidance_for_step(4.0, 0.5, 2.0) == 4.0   # > 1 disables truncation, as in diffusers
    assert sampler.img2img_start(8, 0.6) == 3
    assert sampler.img2img_start(8, 1.0) == 0
    with pytest.raises(ValueError):
        sampler.img2img_start(8, 1.5)


def test_unsupported_scheduler_options_are_refused():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        sampler.SchedulerConfig.from_dict({"shift": 3.0, "use_karras_sigmas": True})
