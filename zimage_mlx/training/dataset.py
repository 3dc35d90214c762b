"""Training data: image folders with captions, aspect-ratio buckets, center crops, cached latents and captions.

Layouts users bring (docs/training.md): a folder of images with same-stem `.txt` captions (kohya / ai-toolkit;
a sub-folder `N_name` repeats its images N times), or a Hugging Face imagefolder `metadata.jsonl` with `file_name`
and `text`. Buckets (kohya / SDXL): sizes of about resolution² pixels with sides in steps of 16; each image goes to
the bucket of nearest aspect ratio, resized to cover it (never more than 2× up) and center-cropped, as diffusers'
DreamBooth script does (Resize then CenterCrop).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
MAX_UPSCALE = 2.0
SIDE_STEP = 16
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """The training data cannot be used: nothing to train on, a caption that cannot be read."""


@dataclass
class Item:
    path: Path
    caption: str
    repeats: int = 1


# ------------------------------------------------------------------------------------------------ scanning
def read_caption(path: Path) -> str:
    """A caption file's text (UTF-8, BOM allowed), stripped; a non-UTF-8 file names the byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: caption is not UTF-8 (invalid byte 0x{data[e.start]:02x} at offset "
                           f"{e.start}); save it as UTF-8") from None


def _metadata_items(root: Path, caption: str | None) -> list[Item]:
    items = []
    meta = root / "metadata.jsonl"
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (ValueError, KeyError, TypeError):
            raise DatasetError(f"{meta}:{n}: expected a JSON object with \"file_name\" and \"text\"") from None
        text = row.get("text") or caption
        if not text:
            raise DatasetError(f"{meta}:{n}: {name} has no \"text\" and no --caption was given")
        items.append(Item(root / name, str(text).strip()))
    return items


def scan_folder(root: str | Path, caption: str | None = None) -> list[Item]:
    """The images of a training folder with their captions (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: training data folder not found")
    if (root / "metadata.jsonl").is_file():
        items = _metadata_items(root, caption)
    else:
        items, missing = [], []
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            match = REPEAT_FOLDER.match(path.parent.name) if path.parent != root else None
            txt = path.with_suffix(".txt")
            if txt.is_file():
                text = read_caption(txt) or caption
            else:
                text = caption
            if not text:
                missing.append(path.name)
                continue
            items.append(Item(path, text, int(match.group(1)) if match else 1))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DatasetError(f"{len(missing)} image(s) have no caption (.txt next to them): "
                               f"{', '.join(missing[:5])}{more}; add captions or pass --caption")
    if not items:
        if not any(root.iterdir()):
            raise DatasetError(f"{root}: the folder is empty")
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return items


# ------------------------------------------------------------------------------------------------ buckets
def make_buckets(resolution: int, step: int = SIDE_STEP) -> list[tuple[int, int]]:
    """(width, height) sizes with sides multiples of `step`, area ≤ resolution², aspect ratios 1:4 … 4:1."""
    if resolution <= 0 or resolution % step:
        raise ValueError(f"resolution must be a positive multiple of {step}, got {resolution}")
    area = resolution * resolution
    out = set()
    for w in range(max(step, resolution // 2 // step * step), 2 * resolution + 1, step):
        h = min(area // w // step * step, 2 * resolution)
        if h >= step and max(w / h, h / w) <= 4:
            out.add((w, h))
            out.add((h, w))
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    w, h = size
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - math.log(w / h)), -b[0] * b[1]))


def open_image(path: Path, notes: set) -> Image.Image | None:
    """The image as RGB, or None (warned, named) when it cannot be read. Palette, RGBA, CMYK, 16-bit and
    animated files are converted; each kind is said once (`notes` collects what was said)."""
    try:
        with Image.open(path) as im:
            im.load()
            kind = None
            if getattr(im, "n_frames", 1) > 1:
                kind = "animated images use their first frame"
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = Image.fromarray((np.asarray(im, np.float64) / 257.0).clip(0, 255).astype(np.uint8))
                kind = kind or "16-bit images are converted to 8-bit RGB"
            elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im.convert("RGBA"))
                kind = kind or "transparent images are put on a white background"
            elif im.mode != "RGB":
                kind = kind or f"{im.mode} images are converted to RGB"
            if kind and kind not in notes:
                notes.add(kind)
                warnings.warn(f"{kind} (first: {path.name})", stacklevel=2)
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        warnings.warn(f"skipping {path}: not a readable image ({e})", stacklevel=2)
        return None


def crop_to_bucket(im: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
    """Resize to cover the bucket (bilinear, keeping the aspect ratio), center-crop: (H, W, 3) float32 in [-1, 1]."""
    bw, bh = bucket
    scale = max(bw / im.width, bh / im.height)
    size = (max(bw, round(im.width * scale)), max(bh, round(im.height * scale)))
    im = im.resize(size, Image.BILINEAR)
    left, top = (size[0] - bw) // 2, (size[1] - bh) // 2
    pixels = np.asarray(im.crop((left, top, left + bw, top + bh)), np.float32)
    return pixels / 127.5 - 1.0


@dataclass
class Sample:
    item: Item
    bucket: tuple[int, int]
    sha256: str


def assign_buckets(items: list[Item], resolution: int) -> list[Sample]:
    """Each readable image with its bucket; unreadable ones and ones smaller than half the bucket are skipped
    with a warning naming them. Raises DatasetError when nothing is left."""
    buckets, notes, out = make_buckets(resolution), set(), []
    for item in items:
        im = open_image(item.path, notes) if item.path.is_file() else None
        if im is None:
            if not item.path.is_file():
                warnings.warn(f"skipping {item.path}: file not found", stacklevel=2)
            continue
        bucket = nearest_bucket(im.size, buckets)
        if max(bucket[0] / im.width, bucket[1] / im.height) > MAX_UPSCALE:
            warnings.warn(f"skipping {item.path.name}: {im.width}x{im.height} is too small for the "
                          f"{bucket[0]}x{bucket[1]} bucket (more than {MAX_UPSCALE:g}x upscaling); lower "
                          "--resolution or use a larger image", stacklevel=2)
            continue
        out.append(Sample(item, bucket, hashlib.sha256(item.path.read_bytes()).hexdigest()))
    if not out:
        raise DatasetError("no usable images left (see the warnings above)")
    return out


# ------------------------------------------------------------------------------------------------ order
def epoch_batches(samples: list[Sample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: sample indices (repeats included) shuffled within each bucket by (seed, epoch),
    cut into batches of one bucket, and the batches shuffled. A pure function, so a resumed run sees the data
    an uninterrupted run sees."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    by_bucket: dict = {}
    for i, s in enumerate(samples):
        by_bucket.setdefault(s.bucket, []).extend([i] * s.item.repeats)
    batches = []
    for bucket in sorted(by_bucket):
        idx = rng.permutation(np.array(by_bucket[bucket]))
        usable = len(idx) // batch_size * batch_size or 0
        batches.extend(idx[i:i + batch_size].tolist() for i in range(0, usable, batch_size))
    if not batches:
        raise DatasetError(f"no bucket holds {batch_size} images; lower --batch-size")
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def batch_at(samples: list[Sample], batch_size: int, seed: int, index: int) -> list[int]:
    """The `index`-th batch of the run (over epochs)."""
    first = epoch_batches(samples, batch_size, seed, 0)
    epoch, pos = divmod(index, len(first))
    return (first if epoch == 0 else epoch_batches(samples, batch_size, seed, epoch))[pos]


# ------------------------------------------------------------------------------------------------ caches
def cache_key(*parts) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def save_array(path: Path, array: np.ndarray) -> None:
    """np.save to a temp file, then os.replace (an interrupted write never leaves a partial cache entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cached(path: Path, compute) -> np.ndarray:
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            path.unlink()
    value = np.asarray(compute(), np.float32)
    save_array(path, value)
    return value
