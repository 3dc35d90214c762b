"""Maintainer script: fit the 16×3 latent→RGB preview map (zimage_mlx.pipeline.preview.LatentRGB) to a VAE by least squares.

    python convert/fit_preview.py path/to/Z-Image-Turbo/vae --images photos/ --output preview_rgb.json
    python convert/fit_preview.py ae.safetensors                  # synthetic smooth colour fields

Each image is encoded (posterior mean) to DiT latents, decoded back, and averaged over 8×8 pixel blocks, so every
latent pixel has the colour the real VAE makes of it; F (16×3) and b (3) minimise ‖latentᵀ·F + b − rgb‖² over all
pixels (zimage_mlx.pipeline.preview.fit_latent_rgb). Prints a table to paste into zimage_mlx/preview.py and, with --output,
writes it as JSON ({"factors": [[r, g, b] × 16], "bias": [r, g, b]}).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from zimage_mlx.pipeline.preview import FLUX_RGB_BIAS, FLUX_RGB_FACTORS, LatentRGB, fit_latent_rgb
from zimage_mlx.loading.components import load_component
from zimage_mlx.loading.single_files import vae_config_from_shapes
from zimage_mlx.loading.weights import safetensors_keys


def load_vae(path: Path, config: Path | None = None):
    """A diffusers vae/ directory, or a single FLUX ae.safetensors (config from `config` or from its shapes)."""
    path = Path(path)
    if path.is_dir():
        return load_component("vae", path, mx.float32)
    if config is not None:
        cfg = json.loads(Path(config).read_text())
    else:
        cfg = vae_config_from_shapes({k: shape for k, (shape, _) in safetensors_keys(path).items()})
    return load_component("vae", path, mx.float32, config=cfg)


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n smooth random colour fields (a 4×4 colour grid upsampled bicubically) with light noise, in [−1, 1]."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        img = np.asarray(grid.resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1
        out.append(np.clip(img + rng.normal(0, 0.05, img.shape), -1, 1))
    return np.stack(out).astype(np.float32)


def load_images(folder: Path, size: int) -> np.ndarray:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise SystemExit(f"{folder}: no .png/.jpg/.webp images")
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.LANCZOS), np.float32) / 127.5 - 1
                     for p in files])


def latent_pairs(vae, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 16, h, w) DiT latents and the (N, h, w, 3) 8×8-block means of their decoded images."""
    f = vae.config.scale_factor
    lats, rgbs = [], []
    for img in images:
        z = vae.encode(mx.array(img[None]))
        dec = np.array(vae.decode(z, tile=None))[0]
        h, w = dec.shape[0] // f, dec.shape[1] // f
        lats.append(np.array(z)[0])
        rgbs.append(dec[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3)))
    return np.stack(lats), np.stack(rgbs)


def rms_error(rgb_map: LatentRGB, latents: np.ndarray, targets: np.ndarray) -> float:
    """RMS difference, in [0, 1] units, between the map's preview and the decoded images' block means."""
    pred = np.array(rgb_map(mx.array(latents)))
    return float(np.sqrt(np.mean((pred - np.clip((targets + 1) / 2, 0, 1)) ** 2)))


def fit(vae, images: np.ndarray) -> dict:
    latents, targets = latent_pairs(vae, images)
    factors, bias = fit_latent_rgb(latents, targets)
    return {"factors": factors.round(4).tolist(), "bias": bias.round(4).tolist(),
            "rms_fitted": rms_error(LatentRGB(factors, bias), latents, targets),
            "rms_default": rms_error(LatentRGB(np.array(FLUX_RGB_FACTORS), np.array(FLUX_RGB_BIAS)), latents, targets)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vae", type=Path, help="diffusers vae/ directory or a FLUX ae.safetensors file")
    ap.add_argument("--vae-config", type=Path, help="config.json for a single-file VAE (default: from its shapes)")
    ap.add_argument("--images", type=Path, help="folder of images (default: synthetic colour fields)")
    ap.add_argument("--num", type=int, default=16, help="synthetic images to use")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--output", type=Path, help="write the fitted numbers as JSON here")
    args = ap.parse_args(argv)
    vae = load_vae(args.vae, args.vae_config)
    images = load_images(args.images, args.size) if args.images else synthetic_images(args.num, args.size)
    result = fit(vae, images)
    print("FACTORS = (")
    for row in result["factors"]:
        print("    (" + ", ".join(f"{v:.4f}" for v in row) + "),")
    print(")\nBIAS = (" + ", ".join(f"{v:.4f}" for v in result["bias"]) + ")")
    print(f"RMS error vs the decoded images (0-1 scale): fitted {result['rms_fitted']:.4f}, "
          f"shipped default {result['rms_default']:.4f}", file=sys.stderr)
    if args.output:
        tmp = args.output.with_name(f".{args.output.name}.part")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.output)
    return result


if __name__ == "__main__":
    main()
