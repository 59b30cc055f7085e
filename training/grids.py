"""Sample grids: (N, C, H, W) images in [-1, 1] tiled into one PIL image."""

import os
from typing import Optional

import numpy as np
import torch
from PIL import Image


def make_grid(samples: torch.Tensor, nrow: Optional[int] = None, pad: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image."""
    n, c, h, w = samples.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    x = (samples.float().cpu() / 2 + 0.5).clamp(0, 1)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = x[
            i
        ]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array[:, :, 0] if c == 1 else array)


def save_grid(samples: torch.Tensor, path: str, nrow: Optional[int] = None, scale: int = 1) -> str:
    """Write `make_grid(samples)` to `path` (parents created), optionally enlarged `scale` times."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image = make_grid(samples, nrow)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path
