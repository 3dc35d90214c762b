"""`zimage-mlx train DATA -o OUT`: train a LoRA on a folder of captioned images (docs/training.md).

Bad arguments print one line and exit 2 before any model loads; run-time failures print one line and exit 1;
Ctrl-C writes a checkpoint and the LoRA so far, says how to resume, and exits 130. Files are written atomically
and only by process 0 of an `mlx.launch` group.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .train_loop import TrainingRun, TrainingSetupError


def build_parser() -> argparse.ArgumentParser:
    from ..loading.hub import DEFAULT_REPO
    from ..training import DEFAULT_TARGETS

    p = argparse.ArgumentParser(prog="zimage-mlx train", description="Train a LoRA on a folder of images.")
    a = p.add_argument
    a("data", help="folder of images with same-stem .txt captions, or with a metadata.jsonl (file_name, text)")
    a("-o", "--output", required=True, help="output folder (lora.safetensors, checkpoints/, samples/, loss.csv)")
    a("--model", "-m", default=DEFAULT_REPO, help="hub id or local folder of Z-Image (Turbo or Base)")
    a("--quantize", "-q", default="none", choices=["4", "8", "none"], help="bits of the frozen base transformer")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    a("--rank", type=int, default=16)
    a("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    a("--targets", nargs="+", default=list(DEFAULT_TARGETS), help="module names, PEFT target_modules style")
    a("--init-lora", default=None, help="a diffusers/PEFT LoRA to start from (its rank and alpha)")
    a("--steps", type=int, default=1000)
    a("--batch-size", type=int, default=1)
    a("--grad-accum", type=int, default=1)
    a("--learning-rate", type=float, default=1e-4)
    a("--optimizer", default="adamw", choices=["adamw", "sgd"])
    a("--weight-decay", type=float, default=1e-4)
    a("--max-grad-norm", type=float, default=1.0)
    a("--weighting-scheme", default="none", choices=["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
    a("--resolution", type=int, default=1024, help="bucket area resolution² (sides multiples of 16)")
    a("--seed", type=int, default=0)
    a("--save-every", type=int, default=250)
    a("--validation-prompt", action="append", default=[], help="repeatable")
    a("--validate-every", type=int, default=250)
    a("--validation-steps", type=int, default=None, help="denoising steps of the samples (model default)")
    a("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    a("--training-adapter", default=None, help="Turbo: the de-distillation LoRA (PATH, hub file, or none)")
    a("--caption", default=None, help="caption for images that have none")
    a("--gradient-checkpointing", default="auto", choices=["auto", "on", "off"])
    a("--parallel", default=None, choices=["data"], help="data-parallel under mlx.launch")
    a("--config", default=None, help="a TOML file with any of these options (command-line values win)")
    a("--quiet", action="store_true")
    a("--verbose", "-v", action="store_true")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        try:
            import tomllib
        except ImportError:     # Python 3.10
            parser.error("--config needs Python 3.11 or later (tomllib)")
        try:
            cfg = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            parser.error(f"--config {args.config}: {e}")
        known = {act.dest for act in parser._actions}
        defaults = {d: parser.get_default(d) for d in known}
        for key, value in cfg.items():
            dest = key.replace("-", "_")
            if dest not in known or dest in ("config", "help"):
                parser.error(f"--config {args.config}: unknown option {key!r}")
            if getattr(args, dest) == defaults[dest]:
                setattr(args, dest, value)
    check_args(parser, args)
    return args


def check_args(parser, args) -> None:
    """Every argument problem as one line (exit 2), before any model loads."""
    for name in ("rank", "steps", "batch_size", "grad_accum", "save_every", "validate_every"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.resolution <= 0 or args.resolution % 16:
        near = max(16, round(args.resolution / 16) * 16)
        parser.error(f"--resolution must be a positive multiple of 16, got {args.resolution} (try {near})")
    if args.alpha is not None and not args.alpha > 0:
        parser.error(f"--alpha must be > 0, got {args.alpha}")
    if not args.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0, got {args.learning_rate}")
    if not Path(args.data).is_dir():
        parser.error(f"DATA {args.data}: not a folder")
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        parser.error(f"--output {out}: not writable ({e.strerror or e})")
    if args.resume and not (out / "checkpoints").is_dir():
        parser.error(f"--resume: nothing to resume in {out} (no checkpoints/); run without --resume to start")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    run = None
    try:
        run = TrainingRun(args)
        run.prepare()
        run.train()
        return 0
    except TrainingSetupError as e:
        print(f"zimage-mlx train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if run is not None and run.trainer is not None:
            saved = run.interrupt()
            print(f"\ninterrupted: {saved}; resume with the same command and --resume", file=sys.stderr)
        else:
            print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's one-line error contract
        if args.verbose:
            import traceback

            traceback.print_exc()
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}{'' if args.verbose else ' (--verbose for the traceback)'}", file=sys.stderr)
        return 1
