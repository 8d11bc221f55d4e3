"""Image conversions and PNG grids (PIL only: torchvision is optional here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] → uint8 in [0, 255], rounded as a saved PNG would be."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # what save_grid's PIL writes by name


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, pad: int = 2, upscale: int = 2) -> Path:
    """uint8 images (N, C, H, W) → one PNG with `nrow` images per row, separated by `pad` black pixels."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3])
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def class_grid_labels(num_classes: int, per_class: int, max_classes: int) -> torch.Tensor:
    """Labels for a grid with one class per row."""
    return torch.arange(min(num_classes, max_classes)).repeat_interleave(per_class)
