"""Fashion-MNIST: the IDX file reader (`read_idx`, `idx_layout`, `check_idx_size`), `load_fashion_mnist`,
`FashionMNISTDataModule` over the published files (Debian's package, the cache or a download) and
`FashionMNISTSampleDataModule` over the sample committed in tests/data, with their constants.
"""
from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from lit_mpdit.data.base import BatchDataset, ImageDataModule, PublishedDataModule, TensorImageDataset, cache_dir, download
from lit_mpdit.errors import ConfigError

FASHION_MNIST_FILES = {  # split -> (images, labels), IDX files as published
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_NAMES = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian/Ubuntu: dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_HOW = (
    "Get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four files in a folder and "
    "pass --data.root FOLDER, or run online with --data.download true."
)

IDX_UNSIGNED_BYTE = 0x08  # the IDX type code of uint8 data, the only one (Fashion-)MNIST uses


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped when named .gz) as a uint8 array; a wrong magic number or a length that disagrees
    with the header (a truncated download) is a ConfigError naming the file."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip stream
        raise ConfigError(f"{path}: unreadable ({e}); delete it and get the dataset again") from e
    header, shape = idx_layout(raw, path)
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise ConfigError(f"{path}: {len(raw)} bytes where its header promises {expected}: truncated or corrupt; get it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def idx_layout(raw: bytes, path: Path) -> tuple[int, tuple[int, ...]]:
    """(header length, shape) from the first bytes of an IDX file of unsigned bytes."""
    if len(raw) < 4 or raw[:3] != bytes([0, 0, IDX_UNSIGNED_BYTE]):
        raise ConfigError(f"{path}: not an IDX file of unsigned bytes (magic number {raw[:4].hex() or 'missing'})")
    header = 4 + 4 * raw[3]  # magic, then one big-endian uint32 per dimension
    if len(raw) < header:
        raise ConfigError(f"{path}: {len(raw)} bytes, shorter than its header: truncated or corrupt; get it again")
    return header, tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))


def check_idx_size(path: Path) -> None:
    """Refuse a truncated IDX file without reading it: the length its header promises against the file's size,
    or for a .gz against the uncompressed size the gzip trailer records (RFC 1952 ISIZE, modulo 2^32)."""
    gzipped = path.suffix == ".gz"
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            header, shape = idx_layout(f.read(4 + 4 * 255), path)  # the longest header: 255 dimensions
        with open(path, "rb") as f:
            if gzipped:
                f.seek(-4, os.SEEK_END)
                size = int.from_bytes(f.read(4), "little")
            else:
                size = f.seek(0, os.SEEK_END)
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(f"{path}: unreadable ({e}); delete it and get the dataset again") from e
    expected = header + math.prod(shape)
    if size != (expected % 2**32 if gzipped else expected):
        raise ConfigError(f"{path}: truncated or corrupt (its header promises {expected} bytes); delete it and get it again")


@lru_cache(maxsize=2)
def load_fashion_mnist(directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Both splits from the four IDX files in `directory`: uint8 images (N, 1, 28, 28) and int64 labels.
    Cached, so the many data modules of a sweep read the files once."""
    splits = {}
    for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
        images, labels = read_idx(directory / image_file), read_idx(directory / label_file)
        if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1] or labels.max() >= 10:
            raise ConfigError(f"{directory}: {image_file} {images.shape} and {label_file} {labels.shape} are not Fashion-MNIST")
        splits[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return splits


class FashionMNISTDataModule(PublishedDataModule):
    """Fashion-MNIST (Xiao et al. 2017): 28×28 grayscale, 10 classes, 60,000 training and 10,000 test images.

    Without `root` it looks in /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist), then in
    `cache_dir()`/fashion-mnist, and downloads into the latter when `download` is on and it is online.
    """

    dataset_name, file_names, how_to_get = "Fashion-MNIST", FASHION_MNIST_NAMES, FASHION_MNIST_HOW

    def __init__(
        self,
        root: str | None = None,  # folder with the four IDX .gz files (or a torchvision root); None = search
        download: bool = True,  # fetch the files into the cache (or `root`) when they are nowhere
        batch_size: int = 128,  # examples per batch on each device
        num_workers: int = 0,  # DataLoader worker processes
        seed: int = 0,  # chooses the validation images
        val_size: int = 1000,  # training images held out for validation
        limit_train: int | None = None,  # train on the first N remaining training images only; None = all
    ):
        super().__init__(batch_size, num_workers, seed, val_size, limit_train)
        self.save_hyperparameters()
        self.image_size, self.in_channels, self.num_classes = 28, 1, 10
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.root = root
        self.download = download
        directory = self._directory()
        if directory is None and not download:
            raise self._missing()
        for name in FASHION_MNIST_NAMES if directory is not None else ():  # a truncated file is refused before work
            check_idx_size(directory / name)

    def _candidates(self) -> list[Path]:
        if self.root is not None:
            return [Path(self.root), Path(self.root) / "FashionMNIST" / "raw"]
        return [FASHION_MNIST_SYSTEM_DIR, cache_dir() / "fashion-mnist"]

    def prepare_data(self) -> None:
        if self._directory() is not None or not self.download:
            return
        target = Path(self.root) if self.root is not None else cache_dir() / "fashion-mnist"
        for name in FASHION_MNIST_NAMES:
            try:
                download(FASHION_MNIST_URL + name, target / name)
            except OSError as e:  # urllib's URLError and socket timeouts are OSErrors
                raise self._missing(f"Downloading {FASHION_MNIST_URL + name} into {target} failed: {e}") from e

    def _load(self) -> dict[str, BatchDataset]:
        directory = self._require_directory()
        return {split: TensorImageDataset(*arrays) for split, arrays in load_fashion_mnist(directory).items()}


SAMPLE_PATH = Path(__file__).resolve().parents[2] / "tests" / "data" / "fmnist_sample.npz"


class FashionMNISTSampleDataModule(ImageDataModule):
    """The committed sample of Fashion-MNIST (tests/data/fmnist_sample.npz, made by make_fmnist_sample.py):
    200 training and 50 test images per class, so tests and smoke runs never need the dataset."""

    def __init__(
        self,
        path: str | None = None,  # the sample .npz; None = the one in this source tree
        batch_size: int = 128,  # examples per batch on each device
        num_workers: int = 0,  # DataLoader worker processes
        seed: int = 0,  # chooses the validation images
        val_size: int = 200,  # training images held out for validation (of 2,000)
        limit_train: int | None = None,  # train on the first N remaining training images only; None = all
    ):
        super().__init__(batch_size, num_workers, seed, val_size, limit_train)
        self.save_hyperparameters()
        self.image_size, self.in_channels, self.num_classes = 28, 1, 10
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.path = Path(path) if path is not None else SAMPLE_PATH
        if not self.path.is_file():
            raise ConfigError(
                f"data.path: the Fashion-MNIST sample {self.path} does not exist; it ships with the source tree "
                "(tests/data) and tests/data/make_fmnist_sample.py rebuilds it"
            )

    def _load(self) -> dict[str, BatchDataset]:
        try:
            with np.load(self.path) as arrays:
                return {
                    split: TensorImageDataset(
                        torch.from_numpy(arrays[f"{split}_images"]).unsqueeze(1),
                        torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64)),
                    )
                    for split in ("train", "test")
                }
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ConfigError(f"{self.path}: not a Fashion-MNIST sample ({e!r})") from e
