"""Sample images as files: [-1, 1] floats -> uint8, one grid layout, OpenAI's `.npz`.

Every program writes images through these functions: `sample.py` (grid of
the samples next to `samples_NxHxWxC.npz`) and the training grids
(`samples/step_XXXXXXX.png`).  The grid puts 1 px white lines between and
around the images and upscales the whole grid by an integer factor (nearest
neighbour), so an 8x8 digit stays legible.
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np

MIN_GRID_CELL = 32  # grid images are upscaled until they are at least this many pixels tall


def to_uint8(x) -> jnp.ndarray:
    """[-1, 1] floats `[..., H, W, C]` -> uint8, `clip(round((x + 1) * 127.5), 0, 255)`.

    OpenAI's sample scripts: `((sample + 1) * 127.5).clamp(0, 255).to(uint8)` after
    rounding; computed in float32 (round half to even, as `np.round`).
    """
    x = jnp.asarray(x, jnp.float32)
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def default_upscale(height: int, min_size: int = MIN_GRID_CELL) -> int:
    """The integer factor that makes a `height`-pixel image at least `min_size` tall (>= 1)."""
    return max(1, min_size // max(1, height))


def image_grid(images: np.ndarray, *, nrow: int | None = None, pad: int = 1, upscale: int | None = None,
               pad_value: int = 255) -> np.ndarray:
    """uint8 `[N, H, W, C]` -> one uint8 `[s * (R * (H + pad) + pad), s * (nrow * (W + pad) + pad), C]` grid.

    Args:
      images: uint8 `[N, H, W, C]`.
      nrow: images per row (default `ceil(sqrt(N))`); R = ceil(N / nrow) rows.
      pad: width of the lines between and around the images.
      upscale: integer nearest-neighbour factor s of the whole grid (default
        `default_upscale(H)`: 8 px images x4).
      pad_value: value of the lines and of empty cells (white).

    Returns:
      The grid, row-major (image i in row i // nrow, column i % nrow).
    """
    images = np.asarray(images)
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top:top + h, left:left + w] = img
    s = default_upscale(h) if upscale is None else int(upscale)
    return np.repeat(np.repeat(grid, s, axis=0), s, axis=1) if s > 1 else grid


def write_png(path: str, image: np.ndarray) -> str:
    """Write uint8 `[H, W, C]` (C = 1 grayscale, 3 RGB) as a PNG, creating its folder; returns `path`."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return path


def npz_path(out: str, shape: tuple[int, ...]) -> str:
    """`out` itself when it ends in .npz, else `out/samples_NxHxWxC.npz` (OpenAI's name)."""
    if out.endswith(".npz"):
        return out
    return os.path.join(out, "samples_" + "x".join(str(d) for d in shape) + ".npz")


def write_npz(out: str, images: np.ndarray, labels: np.ndarray | None = None, extra: dict | None = None) -> str:
    """OpenAI's sample file: `arr_0` uint8 `[N, H, W, C]`, `arr_1` int labels `[N]` (if any), plus `extra`."""
    path = npz_path(out, images.shape)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels
    arrays.update(extra or {})
    np.savez(path, **arrays)
    return path


def write_samples(out: str, images: np.ndarray, labels: np.ndarray | None = None, *, max_grid_images: int = 256,
                  extra: dict | None = None) -> tuple[str, str]:
    """`write_npz` plus a PNG grid of the first `max_grid_images` beside it; returns (npz, png) paths."""
    path = write_npz(out, images, labels, extra)
    png = write_png(path[: -len(".npz")] + ".png", image_grid(images[:max_grid_images]))
    return path, png
