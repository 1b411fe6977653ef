"""Image grids and PNG output shared by the CLI, evaluation and explanation tools.

Example:
    >>> import numpy as np
    >>> from ellsjax import plotting
    >>> grid = plotting.image_grid(np.zeros((6, 8, 8, 1), np.float32), ncols=3)
    >>> grid.shape, grid.dtype
    ((22, 32, 3), dtype('uint8'))
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["to_uint8", "image_grid", "save_png"]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Map ``[-1, 1]`` floats to ``0…255`` for display. Values outside ``[-1, 1]`` (a network may
    overshoot) are shown saturated; the saved arrays keep the raw values."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, *, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``[N, H, W, C]`` images in ``[-1, 1]`` into one RGB uint8 picture with ``pad`` px gaps."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty [N, H, W, C] batch, got shape {images.shape}")
    n, h, w, c = images.shape
    if c not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels, got {c}")
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = -(-n // ncols)
    tiles = to_uint8(images)
    if c == 1:
        tiles = np.repeat(tiles, 3, axis=-1)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = tiles[i]
    return grid


def save_png(path: str | os.PathLike, picture: np.ndarray, *, scale: int = 1) -> Path:
    """Write an ``[H, W, 3]`` uint8 picture as PNG, each pixel repeated ``scale×scale`` times
    (atomically: a failed write leaves the previous file or none)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pic = np.asarray(picture)
    if scale > 1:
        pic = np.repeat(np.repeat(pic, scale, axis=0), scale, axis=1)
    from ellsjax import _io

    with _io.atomic_path(path) as tmp:
        matplotlib.image.imsave(tmp, pic, format="png")
    return path
