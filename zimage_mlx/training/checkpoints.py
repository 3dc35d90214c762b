"""Training checkpoints: `OUT/checkpoints/step-N/` with the LoRA (PEFT file), the optimizer state and the run's
identity (step, model, rank, targets, config). Written into a temporary folder and renamed into place, so a
failed write (disk full, Ctrl-C) leaves every earlier checkpoint intact; the newest complete one is resumed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx

STATE_FILE = "state.json"
IDENTITY = ("model", "rank", "alpha", "targets", "optimizer")   # what must agree for a resume


class CheckpointError(RuntimeError):
    """No checkpoint to resume, or one from another run."""


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under OUT, oldest first."""
    found = []
    for d in (Path(out) / "checkpoints").glob("step-*"):
        step = d.name[len("step-"):]
        if step.isdigit() and (d / STATE_FILE).is_file():
            found.append((int(step), d))
    return sorted(found)


def save_checkpoint(out: Path, trainer, info: dict) -> Path:
    """Write checkpoints/step-N (N = trainer.step_count) atomically; `info` is the run's config and identity."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{trainer.step_count}"
    tmp = root / f".step-{trainer.step_count}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        trainer.save_lora(tmp / "lora.safetensors")
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), trainer.state_arrays())
        state = {**info, "step": trainer.step_count}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_checkpoint(out: Path, trainer, info: dict) -> dict:
    """Restore the newest checkpoint into `trainer`; refuse one made for another model / rank / targets."""
    found = checkpoint_dirs(out)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint in {Path(out) / 'checkpoints'} (run without --resume to "
                              "start a new run)")
    step, d = found[-1]
    state = json.loads((d / STATE_FILE).read_text())
    for k in IDENTITY:
        if state.get(k) != info.get(k):
            raise CheckpointError(f"--resume: {d} was made with {k} {state.get(k)!r}, this run uses "
                                  f"{info.get(k)!r}; use another output folder or the same settings")
    try:
        trainer.load_state_arrays(mx.load(str(d / "optimizer.safetensors")), step)
    except ValueError as e:
        raise CheckpointError(f"--resume: {d}: {e}") from None
    return state
