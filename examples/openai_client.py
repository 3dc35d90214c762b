"""Call a running `zimage-mlx serve` with the official OpenAI SDK (pip install openai).

    zimage-mlx serve --port 8000                       # in another terminal; keeps the model loaded
    python examples/openai_client.py "a lighthouse at dawn" --seed 7

Our extras (seed, num_inference_steps, guidance_scale, negative_prompt, loras) travel in `extra_body`. Image k of
a request with seed s uses seed s + k and equals the Python API's image for that seed.
"""

import argparse
import base64

from openai import OpenAI

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("prompt")
parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
parser.add_argument("--api-key", default="unused", help="what `serve --api-key` was given, if anything")
parser.add_argument("--size", default="1024x1024")
parser.add_argument("-n", type=int, default=1)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--output", default="openai-{seed}.png")
args = parser.parse_args()

client = OpenAI(base_url=args.url, api_key=args.api_key)
extra = {"seed": args.seed, **({"num_inference_steps": args.steps} if args.steps else {})}
result = client.images.generate(model="z-image-turbo", prompt=args.prompt, n=args.n, size=args.size,
                                response_format="b64_json", extra_body=extra)
for k, item in enumerate(result.data):
    path = args.output.format(seed=args.seed + k)
    with open(path, "wb") as f:
        f.write(base64.b64decode(item.b64_json))
    print(f"saved {path}")
