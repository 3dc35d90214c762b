"""PNG files with their generation parameters: written atomically, never over another file unless asked.

Shared by the CLI and the server (both below nothing but the pipeline). Each parameter is a PNG text chunk, plus an
A1111-style "parameters" summary that image viewers and sites that show generation settings already understand;
`zimage-mlx info FILE` prints them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import __version__

PNG_KEYS = ("prompt", "original_prompt", "negative_prompt", "seed", "steps", "guidance", "size", "model",
            "quantization", "dtype", "image", "strength", "loras", "mask", "control_image", "control_type", "control_scale",
            "controlnet", "version")
SHA_PREFIX = 12   # hex digits of a LoRA file's sha256 kept in the metadata


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe_loras(loras) -> str | None:
    """"style.safetensors:0.8 (sha256 0123456789ab), …" for the LoRAs in use ({file, sha256, weight} dicts)."""
    parts = [f"{lo['file']}:{lo['weight']:g}" + (f" (sha256 {lo['sha256'][:SHA_PREFIX]})" if lo.get("sha256") else "")
             for lo in loras or () if lo["weight"] != 0]
    return ", ".join(parts) or None


def png_params(prompt, negative_prompt, seed, steps, guidance, size, model, quantization, dtype,
               image=None, strength=None, loras=None, extra: dict | None = None) -> dict[str, str]:
    """The text chunks of one image: one per parameter, plus an A1111-style "parameters" summary that
    image viewers and sites that show generation settings already understand. `loras`: the pipeline's
    `loras` list (file, sha256, weight); those with weight 0 are left out. extra: more PNG_KEYS (mask,
    control_image, control_type, control_scale, controlnet, original_prompt: the prompt before --enhance)."""
    lora_text = describe_loras(loras)
    params = {"prompt": prompt, "negative_prompt": negative_prompt or None, "seed": seed, "steps": steps,
              "guidance": guidance, "size": size, "model": model, "quantization": quantization, "dtype": dtype,
              "image": image, "strength": strength, "loras": lora_text, **(extra or {}),
              "version": f"zimage-mlx {__version__}"}
    params = {k: str(v) for k, v in params.items() if v is not None}
    a1111 = prompt + (f"\nNegative prompt: {negative_prompt}" if negative_prompt else "")
    a1111 += (f"\nSteps: {steps}, Sampler: Euler (flow matching), CFG scale: {guidance}, Seed: {seed}, "
              f"Size: {size}, Model: {model}, Quantization: {quantization}, Version: zimage-mlx {__version__}")
    if image is not None:
        a1111 += f", Denoising strength: {strength}"
    if lora_text:
        a1111 += f", LoRAs: {lora_text}"
    return {**params, "parameters": a1111}


def save_png(image, path: Path, params: dict[str, str], overwrite: bool = False) -> Path:
    """Write `image` with `params` as PNG text chunks; return the path used.

    The PNG goes to a hidden temporary file next to the target first, so a failed or interrupted write
    never leaves a partial image. Without `overwrite` an existing file is kept and the next free name
    (NAME-1.png, NAME-2.png, ...) is used; a hard link claims the name atomically, so two runs cannot
    write over each other either.
    """
    info = PngInfo()
    for k, v in params.items():
        info.add_text(k, v)  # tEXt when Latin-1, else UTF-8 iTXt
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; the image gets the mode any new file gets
        if overwrite:
            os.replace(tmp, path)
            return path
        candidate, k = path, 0
        while True:
            try:
                os.link(tmp, candidate)
                return candidate
            except FileExistsError:
                k += 1
                candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
            except OSError:  # no hard links on this file system: check, then rename
                while candidate.exists():
                    k += 1
                    candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
                os.replace(tmp, candidate)
                return candidate
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_png_params(path: str | Path) -> dict[str, str]:
    """The zimage-mlx parameters stored in a PNG (empty if there are none)."""
    with Image.open(path) as im:
        im.load()  # text chunks after the image data are read only by load()
        text = dict(getattr(im, "text", {}) or {})
    if "version" not in text or not str(text["version"]).startswith("zimage-mlx"):
        return {}
    return {k: text[k] for k in PNG_KEYS if k in text}
