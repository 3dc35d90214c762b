"""A live preview every step, and cancelling a generation from the step callback.

The pipeline calls `callback(step, sigma, latents)` after each denoising step with the current latents
(B, 16, H/8, W/8). Here it decodes a 2x-downsampled copy with the VAE (a quarter of a full decode's work)
and writes it to --preview, replacing the file atomically so an image viewer that reloads on change shows
the picture forming. Put {step} in the name to keep every step instead.

Returning False from the callback stops the generation (the pipeline raises GenerationCancelled): this
script does so on Ctrl-C and once --time-limit seconds have passed.

    python examples/preview_callback.py "a lighthouse at dusk, oil painting" --preview preview.png
"""

import argparse
import os
import signal
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from zimage_mlx import GenerationCancelled, ZImagePipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("prompt", nargs="?", default="a lighthouse at dusk, oil painting")
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="hub id or local directory")
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--steps", type=int, default=None, help="default: the model's (8 for Turbo)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--preview", default="preview.png", help="preview file; {step} keeps one per step")
parser.add_argument("--preview-scale", type=int, default=2, help="downsample the latents by this before decoding")
parser.add_argument("--time-limit", type=float, default=None, help="cancel after this many seconds")
parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bfloat16 on a GPU")
parser.add_argument("--quantize", default="auto", help="auto | none | 4 | 8 | transformer=4,text_encoder=8")
parser.add_argument("--output", default="preview_callback.png")
args = parser.parse_args()


def save_preview(pipe, latents, path: Path) -> None:
    s = args.preview_scale
    b, c, h, w = latents.shape
    if s > 1 and h % s == 0 and w % s == 0:  # average-pool the latents: a cheap, blurrier decode
        latents = latents.reshape(b, c, h // s, s, w // s, s).mean(axis=(3, 5))
    rgb = pipe.decode_latents(latents)[0]  # (H/s, W/s, 3) in [0, 1]
    image = Image.fromarray((rgb * 255).round().astype(np.uint8))
    tmp = path.with_name(f".{path.name}.part")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)  # viewers never see a half-written file


class Preview:
    """The step callback: saves a preview, returns False to cancel (Ctrl-C or time limit)."""

    def __init__(self, pipe):
        self.pipe, self.t0 = pipe, time.perf_counter()
        self.interrupted = False

    def on_sigint(self, signum, frame):
        self.interrupted = True  # finish the current step, then stop cleanly at the callback

    def __call__(self, step: int, sigma: float, latents: mx.array) -> bool:
        path = Path(args.preview.format(step=step + 1))
        save_preview(self.pipe, latents, path)
        elapsed = time.perf_counter() - self.t0
        print(f"step {step + 1}  sigma {sigma:.3f}  {elapsed:.1f} s  preview: {path}", flush=True)
        if self.interrupted:
            return False
        return args.time_limit is None or elapsed < args.time_limit


pipe = ZImagePipeline.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize)
callback = Preview(pipe)
previous = signal.signal(signal.SIGINT, callback.on_sigint)
try:
    out = pipe(prompt=args.prompt, width=args.width, height=args.height, num_inference_steps=args.steps,
               seed=args.seed, callback=callback)
except GenerationCancelled as e:
    print(f"cancelled: {e}; the last preview is the result so far")
else:
    out.images[0].save(args.output)
    print(f"saved {args.output}")
finally:
    signal.signal(signal.SIGINT, previous)
