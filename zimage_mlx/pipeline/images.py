"""Pixels in and out of the pipeline: input images, inpainting masks, decoded images.

Ports diffusers' `VaeImageProcessor` (image_processor.py: `preprocess` with vae_scale_factor·2 size flooring and
Lanczos resizing, the mask processor's `do_binarize` / `do_convert_grayscale`, `postprocess`) for PIL images, paths
and arrays.

The mask rule (one rule for the Python API, the CLI and the server): white = repaint. A mask whose alpha channel
carries information (an RGBA / LA / PA image, or a palette image with transparency, in which some pixel is not fully
opaque) is read as OpenAI's image-edit masks are: transparent = the area to edit, so the mask is 255 − alpha. Any
other mask (including an RGBA one that is opaque everywhere) is read by its luminance: white = edit.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFilter

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_image(image, mode: str = "RGB", name: str = "image") -> Image.Image:
    """PIL image / path / HW(C) uint8 or [0,1] float array → PIL image in `mode`."""
    image = _as_pil(image, name)
    return image.convert(mode)


def _as_pil(image, name: str) -> Image.Image:
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL image, a path or an HxWx3 array, got {type(image).__name__}")
    return image


def image_size(image, name: str = "image") -> tuple[int, int]:
    """(width, height) of a PIL image / path / HW(C) array, without decoding a file's pixels."""
    if isinstance(image, np.ndarray) and image.ndim >= 2:
        return int(image.shape[1]), int(image.shape[0])
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                return im.size
        except OSError as e:
            raise ValueError(f"{name} {image}: not an image ({e})") from None
    return _as_pil(image, name).size


def mask_image_to_l(mask, name: str = "mask_image") -> Image.Image:
    """A mask in any form → an "L" image, white = repaint, by this module's mask rule (see the module docstring)."""
    m = _as_pil(mask, name)
    if m.mode == "P" and "transparency" in m.info:
        m = m.convert("RGBA")
    if m.mode in ALPHA_MODES:
        alpha = m.getchannel("A")
        if alpha.getextrema()[0] < 255:      # some pixel is not opaque: transparent = edit
            return alpha.point(lambda a: 255 - a)
    return m.convert("L")


def preprocess_image(image, height: int | None, width: int | None, multiple: int) -> np.ndarray:
    """PIL image / path / HWC uint8 or [0,1] float array → (1,H,W,3) float32 in [−1,1].

    Without height/width the image keeps its size floored to a multiple of `multiple` (diffusers'
    VaeImageProcessor with vae_scale_factor·2); resizing uses Lanczos.
    """
    image = load_image(image)
    check_min_size("image", image.size, height, width, multiple)
    w = image.width - image.width % multiple if width is None else width
    h = image.height - image.height % multiple if height is None else height
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.LANCZOS)
    arr = np.asarray(image).astype(np.float32) / 255.0
    return (arr * 2.0 - 1.0)[None]


def check_min_size(name: str, size: tuple[int, int], height, width, multiple: int) -> None:
    """An input image whose own size would set the output size must be at least one size multiple per side."""
    if (width is None and size[0] < multiple) or (height is None and size[1] < multiple):
        what = "the input image" if name == "image" else f"the {name}"
        raise ValueError(f"{name}: {what} is {size[0]}x{size[1]} pixels; it must be at least "
                         f"{multiple}x{multiple} (or give height and width to resize it)")


def preprocess_mask(mask, height: int, width: int, image_size: tuple[int, int] | None = None,
                    blur: float = 0.0) -> np.ndarray:
    """Mask (white = repaint, or transparent = repaint: the module's mask rule; PIL / path / array) → (H, W)
    float32 in {0, 1} as diffusers' mask processor makes it (VaeImageProcessor with do_binarize and
    do_convert_grayscale): grayscale, resized to height×width with Lanczos, /255, binarized at 0.5.

    image_size: the (width, height) of the image the mask belongs to; a mask of another size is resized when its
    aspect ratio agrees within 2 %, refused otherwise. blur > 0: a Gaussian blur of that radius (pixels) and no
    binarization (a feathered mask).
    """
    m = mask_image_to_l(mask)
    if image_size is not None and m.size != tuple(image_size):
        if abs((m.width / m.height) / (image_size[0] / image_size[1]) - 1) > 0.02:
            raise ValueError(f"mask_image is {m.width}x{m.height} but the image is {image_size[0]}x{image_size[1]}: "
                             "give a mask of the image's size (or at least its aspect ratio)")
    if m.size != (width, height):
        m = m.resize((width, height), resample=Image.LANCZOS)
    if blur > 0:
        return np.asarray(m.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32) / 255.0
    return (np.asarray(m, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)


def mask_to_latent(mask: np.ndarray, h: int, w: int, soft: bool = False) -> mx.array:
    """(H, W) pixel mask → (1, 1, h, w) on the latent grid: torch's `interpolate(mode="nearest")` (source index
    floor(i·H/h)), or the area average for a feathered mask."""
    H, W = mask.shape
    if soft:
        return mx.array(mask.reshape(h, H // h, w, W // w).mean(axis=(1, 3))[None, None])
    rows = np.minimum(np.floor(np.arange(h) * np.float32(H / h)).astype(np.int64), H - 1)
    cols = np.minimum(np.floor(np.arange(w) * np.float32(W / w)).astype(np.int64), W - 1)
    return mx.array(mask[rows][:, cols][None, None])


def postprocess(decoded: mx.array) -> np.ndarray:
    """Decoder output NHWC in [−1,1] → float32 numpy in [0,1]."""
    return np.array(mx.clip(decoded.astype(mx.float32) / 2 + 0.5, 0.0, 1.0))


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray((img * 255).round().astype(np.uint8)) for img in images]


def as_mx(a, shape, name: str) -> mx.array:
    """numpy / mx array → float32 mx array of exactly `shape` (a ValueError naming `name` otherwise)."""
    a = a.astype(mx.float32) if isinstance(a, mx.array) else mx.array(np.asarray(a, dtype=np.float32))
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} have shape {tuple(a.shape)}, expected {tuple(shape)} for this size and batch")
    return a
