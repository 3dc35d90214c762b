"""Image to image: repaint an existing picture guided by a prompt.

`strength` is the share of the denoising schedule that is run again: 0 keeps the input, 1 ignores it.
The output keeps the input's size (floored to a multiple of 16) unless --width/--height are given.

    python examples/image_to_image.py photo.png "the same street at night, neon signs" --strength 0.6
"""

import argparse

from zimage_mlx import ZImagePipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("image", help="input image (any format PIL reads)")
parser.add_argument("prompt", nargs="?", default="the same scene as a watercolor painting")
parser.add_argument("--strength", type=float, default=0.6)
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="hub id or local directory")
parser.add_argument("--width", type=int, default=None)
parser.add_argument("--height", type=int, default=None)
parser.add_argument("--steps", type=int, default=None, help="steps of the full schedule (strength runs a part)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bfloat16 on a GPU")
parser.add_argument("--quantize", default="auto", help="auto | none | 4 | 8 | transformer=4,text_encoder=8")
parser.add_argument("--output", default="image_to_image.png")
args = parser.parse_args()

pipe = ZImagePipeline.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize)
out = pipe(prompt=args.prompt, image=args.image, strength=args.strength, width=args.width, height=args.height,
           num_inference_steps=args.steps, seed=args.seed)
image = out.images[0]
image.save(args.output)
print(f"saved {args.output} ({image.width}x{image.height}, strength {args.strength}, {out.timings['total']:.1f} s)")
