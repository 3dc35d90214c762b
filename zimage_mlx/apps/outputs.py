"""Where the CLI's images go: output templates, the writability check made before any model loads, saving with a
fallback, the per-step progress line and the `--preview` file."""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

import click

from .command import note
from .pngfile import save_png

DEFAULT_OUTPUT = "zimage-{seed}.png"


def check_template(ctx, param, value: str) -> str:
    """The --output option: a file, a template with {seed} and {index}, or a directory; always a .png."""
    if value.endswith(("/", os.sep)) or Path(value).is_dir():
        value = str(Path(value) / DEFAULT_OUTPUT)
    try:
        filled = value.format(seed=0, index=0)
    except (KeyError, IndexError, ValueError) as e:
        raise click.BadParameter(f"{value!r}: only {{seed}} and {{index}} can be filled in ({e})") from None
    suffix = Path(filled).suffix.lower()
    if suffix not in ("", ".png"):
        raise click.BadParameter(f"{value!r}: images are written as PNG (their parameters live in PNG text chunks)")
    return value if suffix else value + ".png"


def output_paths(template: str, seeds: list[int]) -> list[Path]:
    """One path per image; several images with a template that names none of them get -{seed} added."""
    if len(seeds) > 1 and not re.search(r"\{(seed|index)[^}]*\}", template):
        stem, suffix = os.path.splitext(template)
        template = f"{stem}-{{seed}}{suffix}"
    return [Path(template.format(seed=s, index=i)) for i, s in enumerate(seeds)]


def check_writable(paths: list[Path]) -> None:
    """Fail before any model loads when an image could not be written (read-only place, parent is a file, ...)."""
    for parent in dict.fromkeys(p.parent for p in paths):
        probe_dir = parent
        while not probe_dir.exists() and probe_dir != probe_dir.parent:
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise click.UsageError(f"cannot write images into {parent}: {probe_dir} is not a folder")
        try:
            with tempfile.TemporaryFile(dir=probe_dir):
                pass
        except OSError as e:
            raise click.UsageError(f"cannot write images into {parent} ({e.strerror or e})") from None


def save_with_fallback(image, path: Path, params: dict, overwrite: bool) -> Path:
    """Save; if the destination fails now (disk full, removed folder), save into the current or temp folder."""
    try:
        return save_png(image, path, params, overwrite=overwrite)
    except OSError as e:
        for folder in (Path.cwd(), Path(tempfile.gettempdir())):
            try:
                saved = save_png(image, folder / path.name, params)
            except OSError:
                continue
            note(f"warning: could not write {path} ({e.strerror or e}); saved the image as {saved} instead")
            return saved
        raise


class Progress:
    """The per-step callback: a one-line bar with seconds per step and ETA on a terminal's stderr,
    a single line per image otherwise."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.live = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.done = 0

    def __call__(self, record):
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        per = elapsed / self.done
        if self.live:
            fill = 24 * self.done // self.total
            click.echo(f"\r{self.label} [{'#' * fill}{'.' * (24 - fill)}] {self.done}/{self.total}  "
                       f"{per:.2f} s/step  ETA {per * (self.total - self.done):.0f} s ",
                       nl=self.done == self.total, err=True)
        elif self.enabled and self.done == self.total:
            click.echo(f"{self.label}: {self.total} steps in {elapsed:.1f} s ({per:.2f} s/step)", err=True)
        return True


class PreviewFile:
    """Wraps the progress callback: after every step, the predicted final image (preview.Previewer) replaces
    `path` atomically (written beside it, then renamed), so an image viewer never shows a half-written file."""

    def __init__(self, path: Path, inner, previewer):
        self.path, self.inner, self.previewer = path, inner, previewer

    def __call__(self, record):
        image = self.previewer.image(record)     # the step's own x̂0 (a denoise.StepRecord)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".png.part", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                image.save(f, format="PNG", compress_level=1)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return self.inner(record)
