"""The run behind `zimage-mlx train`: data and caches, the training adapter, the loop, checkpoints, samples, logs.

Latents (VAE posterior mode) and caption features (`encode_prompt`) are computed once per image / caption and
cached under OUT/cache, keyed by model, file hash and bucket; the text encoder and VAE are then freed. Batch b of
the run, its noise and its σ are functions of (seed, b) only, so `--resume` from a checkpoint reproduces the
uninterrupted run bit for bit.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from ..loading.weights import WeightError
from ..pipeline.pipeline import ZImagePipeline
from ..training import LoRATrainer
from ..training.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from ..training.dataset import assign_buckets, batch_at, cache_key, cached, scan_folder

ADAPTER_NAME = "training_adapter"
DEFAULT_ADAPTER = "ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors"
VALIDATION_SEED = 42


class TrainingSetupError(ValueError):
    """An argument that conflicts with what is on disk (exit 2)."""


class TrainingRun:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.output)
        self.trainer = None
        self.group = None
        self.rank = 0

    # ------------------------------------------------------------------------------------------------ setup
    def prepare(self) -> None:
        a = self.args
        if a.parallel == "data":
            from ..distributed import init_group

            self.group = init_group()
            self.rank = self.group.rank()
            if a.batch_size % self.group.size():
                raise TrainingSetupError(f"--batch-size {a.batch_size} does not split over "
                                         f"{self.group.size()} processes")
        items = scan_folder(a.data, a.caption)
        self.samples = assign_buckets(items, a.resolution)
        self.say(f"{len(self.samples)} images in {len({s.bucket for s in self.samples})} bucket(s)")
        dtype = None if a.dtype == "auto" else a.dtype
        quantize = None if a.quantize == "none" else int(a.quantize)
        self.pipe = ZImagePipeline.from_pretrained(a.model, dtype=dtype, quantize=quantize,
                                                   fused_projections=False)
        self.model_id = str(a.model)
        checkpointing = self._plan_checkpointing({"on": True, "off": False}.get(a.gradient_checkpointing))
        self._cache_inputs()
        self._load_training_adapter()
        self.trainer = LoRATrainer(
            self.pipe, rank=a.rank, alpha=a.alpha, targets=tuple(a.targets), init_lora=a.init_lora,
            optimizer=a.optimizer, learning_rate=a.learning_rate, weight_decay=a.weight_decay,
            max_grad_norm=a.max_grad_norm, gradient_checkpointing=checkpointing, parallel=a.parallel,
            weighting_scheme=a.weighting_scheme, seed=a.seed)
        self.identity = {"model": self.model_id, "rank": self.trainer.rank, "alpha": self.trainer.alpha,
                         "targets": sorted(self.trainer.targets), "optimizer": a.optimizer}
        if a.resume:
            try:
                load_checkpoint(self.out, self.trainer, self.identity)
            except CheckpointError as e:
                raise TrainingSetupError(str(e)) from None
            self.say(f"resuming at step {self.trainer.step_count}")
        if self.rank == 0:
            write_json(self.out / "train_config.json", config_record(a, {
                "variant": self.pipe.variant, "quantization": self.pipe.quantization,
                "gradient_checkpointing": checkpointing, "identity": self.identity,
                "processes": self.trainer.world_size,
                "data": [{"file": str(s.item.path), "sha256": s.sha256, "bucket": list(s.bucket),
                          "caption": s.item.caption, "repeats": s.item.repeats} for s in self.samples]}))

    def _cache_inputs(self) -> None:
        """Latents and caption features of every sample (and validation prompt), cached; then free both models."""
        cache = self.out / "cache"
        self.latents, self.captions = [], {}
        for s in self.samples:
            key = cache_key(self.model_id, self.pipe.dtype_name, s.sha256, s.bucket)
            self.latents.append(cached(cache / "latents" / f"{key}.npy", lambda s=s: self._encode_image(s)))
        texts = {s.item.caption for s in self.samples} | set(self.args.validation_prompt)
        if self.args.validation_prompt:
            texts.add("")          # Base's validation samples use CFG with an empty negative prompt
        for text in sorted(texts):
            key = cache_key(self.model_id, self.pipe.dtype_name, text)
            self.captions[text] = cached(cache / "captions" / f"{key}.npy",
                                         lambda t=text: np.array(self.pipe.encode_prompt([t])[0].astype(mx.float32)))
        self.pipe.free_text_encoder()
        free_vae = getattr(self.pipe, "free_vae", None)
        free_vae() if free_vae else self.pipe._free("vae")

    def _encode_image(self, s) -> np.ndarray:
        from ..training.dataset import DatasetError, crop_to_bucket, open_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = open_image(s.item.path, set())
        if im is None:
            raise DatasetError(f"{s.item.path}: the image became unreadable after it was checked")
        pixels = crop_to_bucket(im, s.bucket)
        return np.array(self.pipe.vae.encode(pixels[None])[0])

    def _load_training_adapter(self) -> None:
        spec = self.args.training_adapter
        if spec is None and self.pipe.variant == "turbo":
            spec = DEFAULT_ADAPTER
        if spec is None or str(spec).lower() == "none":
            self.adapter = None
            return
        try:
            self.pipe.load_lora_weights(spec, adapter_name=ADAPTER_NAME)
        except WeightError as e:
            if spec == DEFAULT_ADAPTER:
                raise WeightError(
                    "Turbo training needs ostris' de-distillation adapter, which is not available here: download "
                    "it once with `hf download ostris/zimage_turbo_training_adapter "
                    "zimage_turbo_training_adapter_v2.safetensors` (or pass its path with --training-adapter "
                    f"PATH), or train without it with --training-adapter none ({e})") from None
            raise
        self.adapter = spec
        self.say(f"training adapter: {spec} (applied while training, never saved into the LoRA)")

    def _plan_checkpointing(self, asked: bool | None) -> bool:
        """Gradient checkpointing as asked, or as the memory plan needs; a run that cannot fit is refused here,
        before any model loads, naming the largest resolution that fits."""
        from ..memory import machine_memory_bytes, plan_training

        budget, _ = machine_memory_bytes()
        per_process = self.args.batch_size // (self.group.size() if self.group else 1)
        try:
            plan = plan_training(self.pipe.configs.get("transformer") or vars(self.pipe.transformer.config),
                                 self.pipe.dtype, self._bits(), self.args.resolution, self.args.rank, per_process,
                                 budget, checkpointing=asked if asked is not None else None)
        except ValueError as e:
            raise TrainingSetupError(str(e)) from None
        self.say(plan.summary())
        return plan.gradient_checkpointing

    def _bits(self):
        return None if self.args.quantize == "none" else int(self.args.quantize)

    # ------------------------------------------------------------------------------------------------ the loop
    def micro_batch(self, index: int):
        idx = batch_at(self.samples, self.args.batch_size, self.args.seed, index)
        x0 = mx.array(np.stack([self.latents[i] for i in idx]))
        caps = [mx.array(self.captions[self.samples[i].item.caption]) for i in idx]
        return x0, caps

    def train(self) -> None:
        a, tr = self.args, self.trainer
        self._log = self._open_log(tr.step_count)
        smoothed, t_start, done0 = None, time.perf_counter(), tr.step_count
        self.stop_requested = False
        previous = signal.signal(signal.SIGINT, self._on_sigint) \
            if threading.current_thread() is threading.main_thread() else None
        try:
            while tr.step_count < a.steps:
                if self.stop_requested:
                    raise KeyboardInterrupt
                smoothed = self._step_and_log(smoothed, t_start, done0)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        self.finish()

    def _on_sigint(self, signum, frame) -> None:
        """The first Ctrl-C stops after the step in flight (so the checkpoint is of a whole step); a second one
        stops at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        print("\nstopping after this step (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    def _step_and_log(self, smoothed, t_start, done0):
        a, tr = self.args, self.trainer
        t0 = time.perf_counter()
        loss = self._one_step()
        dt = time.perf_counter() - t0
        smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
        step = tr.step_count
        if self.rank == 0:
            self._log.writerow([step, f"{loss:.6g}", f"{a.learning_rate:g}", f"{dt:.3f}"])
            self._log_file.flush()
            self.progress(step, smoothed, (time.perf_counter() - t_start) / (step - done0))
        if step % a.save_every == 0 and step < a.steps:
            self.checkpoint()
        if a.validation_prompt and step % a.validate_every == 0:
            self.validate(step)
        return smoothed

    def _one_step(self) -> float:
        a, tr = self.args, self.trainer
        total, grads = 0.0, None
        for j in range(a.grad_accum):
            index = tr.step_count * a.grad_accum + j
            x0, caps = self.micro_batch(index)
            noise, sigmas = tr.draw(tuple(x0.shape), step=index)
            loss, g = tr.loss_and_grads(x0, caps, noise, sigmas)
            mx.eval(loss, g)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            total += float(loss)
        if a.grad_accum > 1:
            grads = tree_map(lambda g: g / a.grad_accum, grads)
        tr.apply(grads)
        loss = total / a.grad_accum
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {tr.step_count}; lower --learning-rate")
        return loss

    def _open_log(self, step: int):
        path = self.out / "loss.csv"
        rows = []
        if path.is_file():     # a resumed run drops what came after its checkpoint
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f) if r and r[0] != "step" and int(r[0]) <= step]
        if self.rank == 0:
            self._log_file = open(path, "w", newline="")
            w = csv.writer(self._log_file)
            w.writerow(["step", "loss", "lr", "seconds"])
            w.writerows(rows)
            return w
        self._log_file = io.StringIO()
        return csv.writer(self._log_file)

    def progress(self, step: int, smoothed: float, rate: float) -> None:
        if self.args.quiet:
            return
        eta = int(rate * (self.args.steps - step))
        peak = mx.get_peak_memory() / 1e9
        line = (f"step {step}/{self.args.steps}  loss {smoothed:.4f}  {rate:.2f} s/step  "
                f"ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}  peak {peak:.1f} GB")
        end = "\n" if step == self.args.steps or not sys.stderr.isatty() else ""
        print(f"\r{line}", end=end, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------------ outputs
    def checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        return save_checkpoint(self.out, self.trainer, self.identity)

    def finish(self) -> None:
        if self.rank == 0:
            self.checkpoint()
            self.trainer.save_lora(self.out / "lora.safetensors")
            self._log_file.close()
            plot_loss(self.out / "loss.csv", self.out / "loss.png")
            self.say(f"wrote {self.out / 'lora.safetensors'}")

    def interrupt(self) -> str:
        """Ctrl-C: the checkpoint and LoRA of the last completed step."""
        if self.rank != 0:
            return "stopped"
        d = self.checkpoint()
        self.trainer.save_lora(self.out / "lora.safetensors")
        return f"saved {d} and {self.out / 'lora.safetensors'} (step {self.trainer.step_count})"

    def validate(self, step: int) -> None:
        """samples/step-N-K.png: each validation prompt at a fixed seed, with the LoRA as trained so far (and
        without the training adapter, as the LoRA will be used)."""
        if self.rank != 0:
            return
        pipe = self.pipe
        if self.adapter:
            pipe.set_adapters([ADAPTER_NAME], [0.0])
        try:
            (self.out / "samples").mkdir(exist_ok=True)
            side = self.args.resolution
            for k, prompt in enumerate(self.args.validation_prompt):
                img = pipe(prompt_embeds=[mx.array(self.captions[prompt])],
                           negative_prompt_embeds=[mx.array(self.captions[""])], height=side, width=side,
                           seed=VALIDATION_SEED, num_inference_steps=self.args.validation_steps).images[0]
                path = self.out / "samples" / f"step-{step}-{k}.png"
                tmp = path.with_name(f".{path.name}.tmp")
                img.save(tmp, format="PNG")
                os.replace(tmp, path)
        finally:
            if self.adapter:
                pipe.set_adapters([ADAPTER_NAME], [1.0])
            free_vae = getattr(pipe, "free_vae", None)
            free_vae() if free_vae else pipe._free("vae")

    def say(self, msg: str) -> None:
        if self.rank == 0 and not self.args.quiet:
            print(msg, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- files
def config_record(args, extra: dict) -> dict:
    """train_config.json: every option plus what the run resolved (variant, bits, data with hashes)."""
    return {"args": dict(vars(args)), **extra}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def plot_loss(csv_path: Path, png_path: Path, size=(640, 360)) -> None:
    """A loss-curve PNG (raw loss grey, smoothed black) drawn with Pillow."""
    from PIL import Image, ImageDraw

    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and r[0] != "step"]
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    if len(rows) >= 2:
        steps = np.array([float(r[0]) for r in rows])
        loss = np.array([float(r[1]) for r in rows])
        smooth = np.copy(loss)
        for i in range(1, len(loss)):
            smooth[i] = 0.9 * smooth[i - 1] + 0.1 * loss[i]
        lo, hi = float(loss.min()), float(loss.max()) or 1.0
        w, h, m = size[0], size[1], 30

        def xy(xs, ys):
            px = m + (xs - steps[0]) / max(steps[-1] - steps[0], 1) * (w - 2 * m)
            py = h - m - (ys - lo) / max(hi - lo, 1e-12) * (h - 2 * m)
            return list(zip(px.tolist(), py.tolist()))

        draw.line(xy(steps, loss), fill=(180, 180, 180), width=1)
        draw.line(xy(steps, smooth), fill=(0, 0, 0), width=2)
        draw.text((m, 5), f"loss {lo:.4g} .. {hi:.4g}, steps {int(steps[0])} .. {int(steps[-1])}", fill="black")
    tmp = png_path.with_name(f".{png_path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, png_path)
