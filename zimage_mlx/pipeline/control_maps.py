"""Control maps that need no model: Canny edges and grayscale (numpy + Pillow only).

Users with depth / pose / HED / MLSD maps pass those maps directly; these two are built in because the
ControlNet Union models were trained on them and they cost nothing to compute.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CONTROL_TYPES = ("none", "canny", "gray")


def _gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32)


def _filter(a: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """1-D correlation along `axis` with edge-reflected borders."""
    r = len(kernel) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="reflect")
    n = a.shape[axis]
    return sum(k * np.take(p, np.arange(i, i + n), axis=axis) for i, k in enumerate(kernel))


def canny(image: Image.Image, low_threshold: float = 100, high_threshold: float = 200,
          sigma: float = 1.4) -> Image.Image:
    """Canny edges (white on black, RGB) with the usual ControlNet preprocessor thresholds (100 / 200 on the
    0-255 gradient magnitude): Gaussian blur, Sobel, non-maximum suppression, hysteresis."""
    if low_threshold > high_threshold:
        raise ValueError(f"canny low_threshold {low_threshold} > high_threshold {high_threshold}")
    g = _gray(image)
    r = max(1, int(round(2 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g = _filter(_filter(g, k / k.sum(), 0), k / k.sum(), 1)
    gx = _filter(_filter(g, np.array([-1.0, 0.0, 1.0]), 1), np.array([1.0, 2.0, 1.0]), 0)
    gy = _filter(_filter(g, np.array([-1.0, 0.0, 1.0]), 0), np.array([1.0, 2.0, 1.0]), 1)
    mag = np.hypot(gx, gy)
    # Non-maximum suppression along the gradient direction quantized to 0/45/90/135 degrees.
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = (((angle + 22.5) // 45) % 4).astype(np.int8)
    p = np.pad(mag, 1)
    h, w = mag.shape
    shifts = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = np.zeros_like(mag, dtype=bool)
    for s, ((dy0, dx0), (dy1, dx1)) in shifts.items():
        n0 = p[1 + dy0: 1 + dy0 + h, 1 + dx0: 1 + dx0 + w]
        n1 = p[1 + dy1: 1 + dy1 + h, 1 + dx1: 1 + dx1 + w]
        keep |= (sector == s) & (mag >= n0) & (mag >= n1)
    mag = np.where(keep, mag, 0.0)
    # Hysteresis: weak edges survive when 8-connected to a strong one.
    weak = mag >= low_threshold
    edges = mag >= high_threshold
    while True:
        q = np.pad(edges, 1)
        grown = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= q[1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]
        grown &= weak
        if (grown == edges).all():
            break
        edges = grown
    out = (edges * 255).astype(np.uint8)
    return Image.fromarray(np.stack([out] * 3, axis=-1))


def gray(image: Image.Image) -> Image.Image:
    """The image in grayscale, as 3 equal channels (the "gray" control: recolouring)."""
    return image.convert("L").convert("RGB")


def control_map(image: Image.Image, control_type: str | None) -> Image.Image:
    """Apply a built-in preprocessor: "canny", "gray", or "none"/None (the image is already a control map)."""
    if control_type in (None, "none"):
        return image.convert("RGB")
    if control_type == "canny":
        return canny(image)
    if control_type == "gray":
        return gray(image)
    raise ValueError(f"unknown control type {control_type!r}; built in: {', '.join(CONTROL_TYPES)} "
                     "(pass a ready depth/pose/... map with control type none)")
