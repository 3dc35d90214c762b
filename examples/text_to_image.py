"""Text to image with the Python API.

    python examples/text_to_image.py "a red fox in the snow, golden hour" --model Tongyi-MAI/Z-Image-Turbo
"""

import argparse

from zimage_mlx import ZImagePipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("prompt", nargs="?", default="a red fox in the snow, golden hour, 35mm photo")
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="hub id or local directory")
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--steps", type=int, default=None, help="default: the model's (8 for Turbo)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bfloat16 on a GPU")
parser.add_argument("--quantize", default="auto", help="auto | none | 4 | 8 | transformer=4,text_encoder=8")
parser.add_argument("--output", default="text_to_image.png")
args = parser.parse_args()

pipe = ZImagePipeline.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize)
out = pipe(prompt=args.prompt, width=args.width, height=args.height, num_inference_steps=args.steps, seed=args.seed)
out.images[0].save(args.output)
print(f"saved {args.output} ({out.timings['total']:.1f} s, peak memory {out.peak_memory_gb:.2f} GB)")
