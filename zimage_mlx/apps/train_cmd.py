"""`zimage-mlx train DATA -o OUT`: train a LoRA on a folder of captioned images (docs/training.md).

Bad arguments print one line and exit 2 before any model loads; run-time failures print one line and exit 1;
Ctrl-C writes a checkpoint and the LoRA so far, says how to resume, and exits 130. Files are written atomically
and only by process 0 of an `mlx.launch` group. Options can come from a TOML file (`--config`): the command line
wins over the file, the file over the defaults.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import click

from ..loading.hub import DEFAULT_REPO
from ..training import DEFAULT_TARGETS
from .command import Command
from .train_loop import TrainingRun, TrainingSetupError

EPILOG = """\b
Examples:
  zimage-mlx train ~/photos/me -o ~/loras/me --quantize 4 --resolution 1024 --steps 1000 \\
      --validation-prompt "a photo of sks person as an astronaut"
  zimage-mlx train ~/photos/me -o ~/loras/me --resume
  zimage-mlx train ~/photos/me -o ~/loras/me --config train.toml

\b
--config FILE: a TOML file with any of these options as keys (steps = 500, learning-rate = 1e-4,
targets = ["to_q", "to_k"]); an option given on the command line wins over the file.

\b
Exit codes: 0 done; 1 failed at run time (one line; --verbose adds the traceback);
2 bad arguments; 130 interrupted (after writing a checkpoint).
"""


def _read_config(ctx: click.Context, param, path):
    """--config FILE (eager, read first): its values become the defaults of the other options, so an option on
    the command line still wins; an unknown key is one line naming it."""
    if path is None:
        return None
    try:
        import tomllib
    except ImportError:     # Python 3.10
        raise click.UsageError("--config needs Python 3.11 or later (tomllib)") from None
    try:
        cfg = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise click.UsageError(f"--config {path}: {e}") from None
    params = {p.name: p for p in ctx.command.params if p.name not in ("config", "help")}
    defaults = {}
    for key, value in cfg.items():
        name = key.replace("-", "_")
        if name not in params:
            raise click.UsageError(f"--config {path}: unknown option {key!r}")
        multiple = getattr(params[name], "multiple", False)
        defaults[name] = [value] if multiple and isinstance(value, str) else value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


def _targets(ctx, param, values) -> list[str]:
    """--targets: repeated and/or comma-separated module names."""
    return [t for v in values for t in str(v).split(",") if t] or list(DEFAULT_TARGETS)


def check_args(args) -> None:
    """Every argument problem as one line (exit 2), before any model loads (also those from --config)."""
    for name in ("rank", "steps", "batch_size", "grad_accum", "save_every", "validate_every"):
        if getattr(args, name) <= 0:
            raise click.UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.resolution <= 0 or args.resolution % 16:
        near = max(16, round(args.resolution / 16) * 16)
        raise click.UsageError(f"--resolution must be a positive multiple of 16, got {args.resolution} (try {near})")
    if args.alpha is not None and not args.alpha > 0:
        raise click.UsageError(f"--alpha must be > 0, got {args.alpha}")
    if not args.learning_rate > 0:
        raise click.UsageError(f"--learning-rate must be > 0, got {args.learning_rate}")
    if not Path(args.data).is_dir():
        raise click.UsageError(f"DATA {args.data}: not a folder")
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise click.UsageError(f"--output {out}: not writable ({e.strerror or e})") from None
    if args.resume and not (out / "checkpoints").is_dir():
        raise click.UsageError(f"--resume: nothing to resume in {out} (no checkpoints/); run without --resume to "
                               "start")


def run_training(args) -> int:
    """The run: its exit code (2 for an argument that conflicts with what is on disk or the machine)."""
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    run = None
    try:
        run = TrainingRun(args)
        run.prepare()
        run.train()
        return 0
    except TrainingSetupError as e:
        click.echo(f"Error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        if run is not None and run.trainer is not None:
            saved = run.interrupt()
            click.echo(f"\ninterrupted: {saved}; resume with the same command and --resume", err=True)
        else:
            click.echo("\ninterrupted", err=True)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's one-line error contract
        if args.verbose:
            import traceback

            traceback.print_exc()
        msg = " ".join(str(e).split()) or type(e).__name__
        click.echo(f"error: {msg}{'' if args.verbose else ' (--verbose for the traceback)'}", err=True)
        return 1


WEIGHTINGS = ["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"]


@click.command("train", cls=Command, epilog=EPILOG)
@click.argument("data", required=True)
@click.option("--output", "-o", required=True,
              help="Output folder (lora.safetensors, checkpoints/, samples/, loss.csv).")
@click.option("--config", type=click.Path(dir_okay=False), default=None, is_eager=True, callback=_read_config,
              help="A TOML file with any of these options (the command line wins).")
@click.option("--model", "-m", default=DEFAULT_REPO, show_default=True,
              help="Hub id or local folder of Z-Image (Turbo or Base).")
@click.option("--quantize", "-q", type=click.Choice(["4", "8", "none"]), default="none", show_default=True,
              help="Bits of the frozen base transformer.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True,
              help="Compute dtype; auto = bfloat16 on a GPU, float32 on the CPU.")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha  [default: the rank]")
@click.option("--targets", multiple=True, callback=_targets, metavar="NAMES",
              help=f"Module names, PEFT target_modules style; repeat or separate with commas  "
                   f"[default: {','.join(DEFAULT_TARGETS)}]")
@click.option("--init-lora", default=None, help="A diffusers/PEFT LoRA to start from (its rank and alpha).")
@click.option("--steps", type=int, default=1000, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Images per step.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--learning-rate", type=float, default=1e-4, show_default=True, help="Learning rate.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True,
              help="Optimizer (AdamW is torch's).")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True, help="Decoupled weight decay.")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True,
              help="Clip the LoRA gradients' global norm to this.")
@click.option("--weighting-scheme", type=click.Choice(WEIGHTINGS), default="none", show_default=True,
              help="Timestep sampling / loss weighting (diffusers' compute_density_for_timestep_sampling).")
@click.option("--resolution", type=int, default=1024, show_default=True,
              help="Bucket area resolution² (sides multiples of 16).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the batch order, noise and σ.")
@click.option("--save-every", type=int, default=250, show_default=True, help="Checkpoint every N steps.")
@click.option("--validation-prompt", multiple=True, help="A prompt sampled during training; repeatable.")
@click.option("--validate-every", type=int, default=250, show_default=True,
              help="Sample the validation prompts every N steps.")
@click.option("--validation-steps", type=int, default=None,
              help="Denoising steps of the samples  [default: the model's]")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUTPUT.")
@click.option("--training-adapter", default=None,
              help="Turbo: the de-distillation LoRA (PATH, hub file, or none)  [default: ostris' v2 adapter]")
@click.option("--caption", default=None, help="Caption for images that have none.")
@click.option("--gradient-checkpointing", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True, help="Recompute each block's activations in the backward pass (auto: if needed).")
@click.option("--parallel", type=click.Choice(["data"]), default=None,
              help="Under mlx.launch: data = each process trains on its share of the batch.")
@click.option("--quiet", is_flag=True, help="No progress line.")
@click.option("--verbose", "-v", is_flag=True, help="Show the traceback when something fails.")
@click.pass_context
def train(ctx, **o):
    """Train a LoRA on DATA, a folder of images with same-stem .txt captions (or a metadata.jsonl with file_name
    and text)."""
    o["validation_prompt"] = list(o["validation_prompt"])
    args = SimpleNamespace(**o)
    check_args(args)
    ctx.exit(run_training(args))


def main(argv: list[str] | None = None) -> int:
    """`zimage-mlx train ARGS` as a function: the exit code; bad arguments print one line and exit 2
    (SystemExit), as on the command line."""
    try:
        return train.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="zimage-mlx train",
                          standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
