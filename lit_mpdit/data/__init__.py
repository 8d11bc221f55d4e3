"""Data modules: Fashion-MNIST (the embedded default), its committed sample, CIFAR-10, image folders, VAE latents.

Every module knows its shape right after construction (`image_size`, `in_channels`, `num_classes`: the CLI
links them into the model) and yields batches `(x, y)`: x float32 (N, C, H, W), in [-1, 1] for images and
normalized per channel for latents; y int64 class labels. Validation images are held out of the training
split, the same ones for a given `seed`. Datasets build a whole batch in one call (`__getitems__`), so
pixels stay uint8 in memory and are converted a batch at a time.

    dm = FashionMNISTSampleDataModule(val_size=100)  # tests: the committed sample, no dataset needed
    x, y = next(iter(dm.train_dataloader()))         # (128, 1, 28, 28) in [-1, 1], (128,) int64

One module per data source and one for what they share; every name is re-exported here, so class paths such
as `lit_mpdit.data.FashionMNISTDataModule` (in configs and checkpoints) stay as they were: `base` (batch
datasets, the held-out split, `EpochShuffle`, `HeldOutDataModule`, `ImageDataModule`), `fashion_mnist`,
`cifar10`, `image_folder`, `latents` (the latents files, `LatentsDataModule` and the prepare-latents encoder)
and `registry` (`DATAMODULES`, `instantiate_datamodule`, `reference_name`).
"""
from __future__ import annotations

from lit_mpdit.data.base import (
    Batch,
    BatchDataset,
    EpochShuffle,
    HeldOutDataModule,
    ImageDataModule,
    ImageDataset,
    Indices,
    TensorImageDataset,
    cache_dir,
    download,
    draw_images,
    held_out_split,
    keep_batch,
    to_unit_range,
)
from lit_mpdit.data.cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10_FILES,
    CIFAR10_FOLDER,
    CIFAR10_HOW,
    CIFAR10_NAMES,
    CIFAR10_URL,
    CIFAR10DataModule,
    read_cifar_batch,
)
from lit_mpdit.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_HOW,
    FASHION_MNIST_NAMES,
    FASHION_MNIST_SYSTEM_DIR,
    FASHION_MNIST_URL,
    IDX_UNSIGNED_BYTE,
    SAMPLE_PATH,
    FashionMNISTDataModule,
    FashionMNISTSampleDataModule,
    check_idx_size,
    idx_layout,
    load_fashion_mnist,
    read_idx,
)
from lit_mpdit.data.image_folder import IMAGE_SUFFIXES, ImageFileDataset, ImageFolderDataModule, load_image, scan_image_folder
from lit_mpdit.data.latents import LATENT_KEYS, LatentDataset, LatentsDataModule, load_latents, save_latents
from lit_mpdit.data.registry import DATAMODULES, build_datamodule, datamodule_name, instantiate_datamodule, reference_name

__all__ = [
    # base
    "Batch",
    "Indices",
    "cache_dir",
    "download",
    "keep_batch",
    "to_unit_range",
    "BatchDataset",
    "ImageDataset",
    "TensorImageDataset",
    "held_out_split",
    "EpochShuffle",
    "HeldOutDataModule",
    "draw_images",
    "ImageDataModule",
    # fashion_mnist
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_NAMES",
    "FASHION_MNIST_URL",
    "FASHION_MNIST_SYSTEM_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_HOW",
    "IDX_UNSIGNED_BYTE",
    "read_idx",
    "idx_layout",
    "check_idx_size",
    "load_fashion_mnist",
    "FashionMNISTDataModule",
    "SAMPLE_PATH",
    "FashionMNISTSampleDataModule",
    # cifar10
    "CIFAR10_URL",
    "CIFAR10_FOLDER",
    "CIFAR10_FILES",
    "CIFAR10_NAMES",
    "CIFAR10_CLASSES",
    "CIFAR10_HOW",
    "read_cifar_batch",
    "CIFAR10DataModule",
    # image_folder
    "IMAGE_SUFFIXES",
    "load_image",
    "ImageFileDataset",
    "scan_image_folder",
    "ImageFolderDataModule",
    # latents
    "LATENT_KEYS",
    "save_latents",
    "load_latents",
    "LatentDataset",
    "LatentsDataModule",
    # registry
    "DATAMODULES",
    "build_datamodule",
    "datamodule_name",
    "instantiate_datamodule",
    "reference_name",
]
