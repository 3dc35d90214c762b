"""Inpainting: repaint the white part of a mask, keep the rest — optionally steered by a ControlNet.

The mask is white where the image is repainted (any size with the image's aspect ratio; it is resized). With
--controlnet (a Z-Image-Turbo-Fun-Controlnet-Union file or folder) the photo's canny edges steer the new content.

    python examples/inpaint.py room.png mask.png "a red armchair by the window"
    python examples/inpaint.py room.png mask.png "a red armchair" --controlnet Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors
"""

import argparse

from zimage_mlx import ZImagePipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("image")
parser.add_argument("mask", help="white = repaint, black = keep")
parser.add_argument("prompt")
parser.add_argument("--strength", type=float, default=1.0, help="1 repaints the masked part from noise")
parser.add_argument("--controlnet", default=None, help="ControlNet Union file/folder: canny edges of the image")
parser.add_argument("--control-scale", type=float, default=0.75)
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="hub id or local directory")
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bfloat16 on a GPU")
parser.add_argument("--quantize", default="auto", help="auto | none | 4 | 8 | transformer=4,text_encoder=8")
parser.add_argument("--output", default="inpaint.png")
args = parser.parse_args()

pipe = ZImagePipeline.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize,
                                      controlnet=args.controlnet)
control = {}
if args.controlnet:
    control = dict(control_image=args.image, control_type="canny", controlnet_conditioning_scale=args.control_scale)
out = pipe(prompt=args.prompt, image=args.image, mask_image=args.mask,
           strength=None if args.controlnet else args.strength, num_inference_steps=args.steps, seed=args.seed,
           **control)
image = out.images[0]
image.save(args.output)
print(f"saved {args.output} ({image.width}x{image.height}{', canny ControlNet' if control else ''}, "
      f"{out.timings['total']:.1f} s)")
