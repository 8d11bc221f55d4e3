"""Image files on disk: `load_image` (one file, center-cropped and resized), `ImageFileDataset` (files decoded
batch by batch), `scan_image_folder` (a class-per-folder tree) and `ImageFolderDataModule` over such a tree.
The latents module uses the first three for its FID references and for encoding.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lit_mpdit.data.base import BatchDataset, ImageDataModule, ImageDataset, Indices
from lit_mpdit.errors import ConfigError, check_choice

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_image(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """One image file as uint8 (C, H, W): the central square, resized to `image_size` (antialiased bicubic)."""
    try:
        with Image.open(path) as img:
            mode = "L" if channels == 1 else "RGB"
            square = ImageOps.fit(img.convert(mode), (image_size, image_size), Image.Resampling.BICUBIC)
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ConfigError(f"{path}: not a readable image ({e})") from e
    pixels = np.asarray(square, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


class ImageFileDataset(ImageDataset):
    """Image files decoded when their batch is asked for (in the DataLoader's workers)."""

    def __init__(
        self,
        files: Sequence[Path],  # one image file per example
        labels: torch.Tensor,  # (N,) int64
        image_size: int,  # side of the square the images are cropped and resized to
        channels: int,  # 1 = grayscale, 3 = RGB
    ):
        self.files = list(files)
        self.labels = labels
        self.image_size = image_size
        self.channels = channels

    def uint8(self, indices: Indices) -> torch.Tensor:
        return torch.stack([load_image(self.files[int(i)], self.image_size, self.channels) for i in indices])

    def subset(self, indices: torch.Tensor) -> ImageFileDataset:
        files = [self.files[int(i)] for i in indices]
        return ImageFileDataset(files, self.labels[indices], self.image_size, self.channels)


def scan_image_folder(root: str | Path, option: str = "data.root") -> tuple[list[Path], list[int], list[str]]:
    """Files, labels and sorted class names of a class-per-folder tree ROOT/<class>/**/<image>.png|jpg."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{option}: {root} is not a directory (expected ROOT/<class>/<image>.png)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        files += found
        labels += [label] * len(found)
    if not files:
        raise ConfigError(f"{option}: no PNG or JPEG images in class folders under {root} (expected ROOT/<class>/<image>.png)")
    return files, labels, classes


class ImageFolderDataModule(ImageDataModule):
    """Any class-per-folder tree of PNG/JPEG images (classes in sorted order), decoded batch by batch:
    the central square of each image, resized to `image_size`."""

    def __init__(
        self,
        root: str,  # ROOT/<class>/<image>.png|jpg; images may sit deeper below the class folder
        image_size: int = 64,  # side of the square images
        channels: int = 3,  # 3 = RGB, 1 = grayscale
        batch_size: int = 128,  # examples per batch on each device
        num_workers: int = 0,  # DataLoader worker processes (they decode the images)
        seed: int = 0,  # chooses the validation images
        val_size: int = 1000,  # training images held out for validation
        limit_train: int | None = None,  # train on the first N remaining training images only; None = all
    ):
        super().__init__(batch_size, num_workers, seed, val_size, limit_train)
        self.save_hyperparameters()
        check_choice("data.channels", channels, (1, 3))
        if image_size < 1:
            raise ConfigError(f"data.image_size: must be at least 1, got {image_size}")
        self._files, self._labels, self.class_names = scan_image_folder(root)
        self.image_size, self.in_channels, self.num_classes = image_size, channels, len(self.class_names)

    def _load(self) -> dict[str, BatchDataset]:
        labels = torch.tensor(self._labels, dtype=torch.int64)
        return {"train": ImageFileDataset(self._files, labels, self.image_size, self.in_channels)}
