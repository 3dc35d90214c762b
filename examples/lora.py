"""LoRAs: load one or more, mix them with weights, switch them off — the base model is never reloaded.

Each LoRA runs as a side branch next to the layer it adapts, so a 4-bit model keeps the LoRA's full effect
(merging it into 4-bit codes would mostly erase it). Any published Z-Image LoRA format loads (diffusers/PEFT,
ai-toolkit, kohya/musubi, ComfyUI, LoKr); a hub file is given as "owner/repo/file.safetensors".

    python examples/lora.py "a portrait in ink" style.safetensors:0.8 detail.safetensors:0.4
"""

import argparse
from pathlib import Path

from zimage_mlx import ZImagePipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("prompt")
parser.add_argument("loras", nargs="+", help="PATH[:WEIGHT] (weight 1.0 when omitted)")
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="hub id or local directory")
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bfloat16 on a GPU")
parser.add_argument("--quantize", default="auto", help="auto | none | 4 | 8 | transformer=4,text_encoder=8")
parser.add_argument("--output", default="lora-{name}.png", help="{name} becomes 'with' and 'without'")
args = parser.parse_args()

pipe = ZImagePipeline.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize,
                                      height=args.height, width=args.width)


def path_and_weight(spec: str) -> tuple[str, float]:
    path, sep, weight = spec.rpartition(":")
    try:
        return (path, float(weight)) if sep else (spec, 1.0)
    except ValueError:       # a ":" that is part of the path
        return spec, 1.0


names, weights = [], []
for path, weight in map(path_and_weight, args.loras):
    names.append(pipe.load_lora_weights(path, adapter_name=Path(path).stem))
    weights.append(weight)
pipe.set_adapters(names, adapter_weights=weights)

common = dict(prompt=args.prompt, width=args.width, height=args.height, num_inference_steps=args.steps,
              seed=args.seed)
for label in ("with", "without"):
    if label == "without":
        pipe.set_adapters(names, adapter_weights=[0.0] * len(names))   # off, without reloading anything
    out = pipe(**common)
    path = args.output.format(name=label)
    out.images[0].save(path)
    print(f"saved {path} ({label} {', '.join(f'{n}:{w:g}' for n, w in zip(names, weights))}, "
          f"{out.timings['total']:.1f} s)")
