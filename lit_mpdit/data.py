"""Data modules: Fashion-MNIST (the embedded default), its committed sample, CIFAR-10, image folders, VAE latents.

Every module knows its shape right after construction (`image_size`, `in_channels`, `num_classes`: the CLI
links them into the model) and yields batches `(x, y)`: x float32 (N, C, H, W), in [-1, 1] for images and
normalized per channel for latents; y int64 class labels. Validation images are held out of the training
split, the same ones for a given `seed`. Datasets build a whole batch in one call (`__getitems__`), so
pixels stay uint8 in memory and are converted a batch at a time.

    dm = FashionMNISTSampleDataModule(val_size=100)  # tests: the committed sample, no dataset needed
    x, y = next(iter(dm.train_dataloader()))         # (128, 1, 28, 28) in [-1, 1], (128,) int64
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
import tarfile
import urllib.request
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from lit_mpdit.errors import ConfigError, check_choice
from lit_mpdit.images import to_uint8

Batch = tuple[torch.Tensor, torch.Tensor]
Indices = Sequence[int] | torch.Tensor


def cache_dir() -> Path:
    """Where downloads go: $LIT_MPDIT_CACHE, else $XDG_CACHE_HOME/lit_mpdit (~/.cache/lit_mpdit)."""
    if os.environ.get("LIT_MPDIT_CACHE"):
        return Path(os.environ["LIT_MPDIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lit_mpdit"


def download(url: str, dest: Path) -> Path:
    """Fetch `url` into `dest` through a `.part` file, so an interrupted download never leaves a partial `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # one per process: sweep workers may fetch it at once
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def _first_complete(candidates: Sequence[Path], names: Sequence[str]) -> Path | None:
    """The first candidate directory that holds every file in `names`."""
    return next((d for d in candidates if all((d / n).is_file() for n in names)), None)


def _not_found(dataset: str, names: Sequence[str], looked: Sequence[Path], how: str, why: str = "") -> ConfigError:
    places = "\n".join(f"  {p}" for p in looked)
    reason = f"\n{why}" if why else ""
    return ConfigError(f"{dataset} not found: looked for {', '.join(names)} in\n{places}{reason}\n{how}")


# ---------------------------------------------------------------------------------------------------------
# Datasets that build whole batches


def keep_batch(batch: Batch) -> Batch:
    """collate_fn for `BatchDataset`: `__getitems__` has already built the batch."""
    return batch


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] → float32 in [-1, 1] (the inverse of `lit_mpdit.images.to_uint8`)."""
    return images.float().div_(127.5).sub_(1.0)


class BatchDataset(Dataset, ABC):
    """A map-style dataset whose DataLoader (with `collate_fn=keep_batch`) fetches a batch in one call."""

    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Batch:
        x, y = self.__getitems__([index])
        return x[0], y[0]

    @abstractmethod
    def __getitems__(self, indices: Indices) -> Batch:
        """The examples at `indices`, collated: x (N, C, H, W) float32 and y (N,) int64."""

    @abstractmethod
    def subset(self, indices: torch.Tensor) -> BatchDataset:
        """A dataset of the examples at `indices` only."""


class ImageDataset(BatchDataset):
    """Images in [-1, 1], kept as uint8 until a batch is asked for."""

    @abstractmethod
    def uint8(self, indices: Indices) -> torch.Tensor:
        """The images at `indices` as uint8 (N, C, H, W)."""

    def __getitems__(self, indices: Indices) -> Batch:
        return to_unit_range(self.uint8(indices)), self.labels[indices]


class TensorImageDataset(ImageDataset):
    """Images held in memory as one uint8 tensor."""

    def __init__(
        self,
        images: torch.Tensor,  # (N, C, H, W) uint8
        labels: torch.Tensor,  # (N,) int64
    ):
        self.images = images
        self.labels = labels

    def uint8(self, indices: Indices) -> torch.Tensor:
        return self.images[indices]

    def subset(self, indices: torch.Tensor) -> TensorImageDataset:
        return TensorImageDataset(self.images[indices], self.labels[indices])


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


class LatentDataset(BatchDataset):
    """VAE posteriors: every fetch draws z = mean + std·ε afresh and normalizes it to (z − shift) / scale."""

    def __init__(
        self,
        mean: torch.Tensor,  # (N, C, H, W) posterior means, float16 or float32, possibly memory-mapped
        std: torch.Tensor,  # (N, C, H, W) posterior standard deviations
        labels: torch.Tensor,  # (N,) int64
        shift: torch.Tensor,  # (C,) dataset mean of the latents
        scale: torch.Tensor,  # (C,) dataset standard deviation of the latents
        rows: torch.Tensor | None = None,  # this dataset's rows of the arrays; None = all
    ):
        # Subsets index the shared arrays instead of copying them: a memory-mapped file stays on disk.
        self.mean, self.std, self.all_labels = mean, std, labels
        self.rows = torch.arange(len(labels)) if rows is None else rows
        self.labels = labels[self.rows]
        self.shift = shift.float().view(-1, 1, 1)
        self.scale = scale.float().view(-1, 1, 1)

    def __getitems__(self, indices: Indices) -> Batch:
        rows = self.rows[indices]
        mean = self.mean[rows].float()  # (N, C, H, W)
        z = mean + self.std[rows].float() * torch.randn_like(mean)  # a fresh sample of each posterior
        return (z - self.shift) / self.scale, self.labels[indices]

    def subset(self, indices: torch.Tensor) -> LatentDataset:
        return LatentDataset(self.mean, self.std, self.all_labels, self.shift, self.scale, self.rows[indices])


# ---------------------------------------------------------------------------------------------------------
# The common data module


def held_out_split(n: int, val_size: int, seed: int, limit_train: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) into n training examples: `val_size` drawn by `seed`, then the first `limit_train`
    of the rest in file order (so validation does not change with `limit_train`)."""
    if not 0 <= val_size < n:
        raise ConfigError(f"data.val_size: must be in [0, {n}) for a training split of {n} examples, got {val_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values[:limit_train], order[:val_size].sort().values


class EpochShuffle(DistributedSampler):
    """A random order per epoch that depends only on (seed, epoch), so a resumed run sees the same data.

    With `world` > 1 processes of `batch_size` each, global batch b is the slice [b·B·W, (b+1)·B·W) of the
    same order and rank r takes its r-th part: W processes see exactly the batches of one process with batch
    B·W (the last incomplete global batch is dropped). Being a DistributedSampler, Lightning keeps it as it is
    under DDP; it calls `set_epoch` before every epoch."""

    def __init__(self, n: int, seed: int, batch_size: int = 1, rank: int = 0, world: int = 1):
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.n, self.batch_size, self._skip = n, batch_size, 0

    def skip_once(self, batches: int) -> None:
        """Start the next epoch's order after the first `batches` batches of every process."""
        self._skip = batches * self.batch_size * self.num_replicas

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        skip, self._skip = self._skip, 0
        if self.num_replicas > 1:
            step = self.batch_size * self.num_replicas
            order = order[: self.n // step * step].view(-1, self.num_replicas, self.batch_size)[:, self.rank].flatten()
            skip //= self.num_replicas
        return iter(order[skip:].tolist())

    def __len__(self) -> int:
        if self.num_replicas == 1:
            return self.n
        return self.n // (self.batch_size * self.num_replicas) * self.batch_size


class HeldOutDataModule(L.LightningDataModule, ABC):
    """Loaders over the splits "train" and "val" (held out of the training split) and, where one exists, "test".

    `batch_size` is per device. Subclasses set `image_size`, `in_channels`, `num_classes` and `class_names`
    in their constructor and load their splits in `_load`.
    """

    image_size: int
    in_channels: int
    num_classes: int
    class_names: list[str]

    def __init__(
        self,
        batch_size: int,  # examples per batch on each device
        num_workers: int,  # DataLoader worker processes; 0 = load in the main process
        seed: int,  # chooses the validation examples
        val_size: int,  # training examples held out for validation
        limit_train: int | None,  # train on the first N remaining training examples only; None = all
    ):
        super().__init__()
        minimums = (("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("limit_train", limit_train, 1))
        for option, value, least in minimums:
            if value is not None and value < least:
                raise ConfigError(f"data.{option}: must be at least {least}, got {value}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_size = val_size
        self.limit_train = limit_train
        self._splits: dict[str, BatchDataset] = {}

    @abstractmethod
    def _load(self) -> dict[str, BatchDataset]:
        """The splits as stored: "train" (validation examples still in) and, where one exists, "test"."""

    @cached_property
    def full_splits(self) -> dict[str, BatchDataset]:
        """The stored splits, loaded once."""
        return self._load()

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        train, val = held_out_split(len(self.full_splits["train"]), self.val_size, self.seed, self.limit_train)
        whole = self.full_splits["train"]
        self._splits = {**self.full_splits, "train": whole.subset(train), "val": whole.subset(val)}

    def dataset(self, split: str) -> BatchDataset:
        """The dataset behind `split`'s loader: "train", "val" or "test"."""
        self.setup()
        check_choice(f"{type(self).__name__} split", split, self._splits)
        return self._splits[split]

    def _loader(self, split: str, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            sampler=sampler,
            # Its own generator: creating an iterator then never draws from the global stream, which
            # training uses for noise and timesteps (a resumed run would otherwise be shifted by one draw).
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=keep_batch,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochShuffle(len(self.dataset("train")), self.seed, self.batch_size, rank, world)
        if trainer is not None and trainer.fit_loop.restarting:
            # Resumed mid-epoch: the epoch's order is a function of (seed, epoch), so skipping the
            # batches it already consumed continues the data stream exactly.
            sampler.skip_once(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """`predict` draws labels, not data: the model's loader (it knows how many images per class to draw)."""
        return self.trainer.lightning_module.predict_dataloader()

    @abstractmethod
    def reference_images(self, split: str, n: int | None = None) -> torch.Tensor:
        """`n` real images of `split` as uint8 (N, C, H, W), the set generated samples are compared with by FID."""

    def check_reference(self, split: str) -> None:
        """Raise `ConfigError` unless `reference_images(split)` can give images (checked before training)."""

    def reference_source(self, split: str) -> str:
        """Where reference images of `split` come from, when not from the stored split itself ("" then)."""
        return ""

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        """Generated samples (in the space the model was trained on) as uint8 images (N, C, H, W)."""
        return to_uint8(samples)


def draw_images(images: ImageDataset, n: int | None, seed: int) -> torch.Tensor:
    """All of `images` as uint8 in stored order when `n` is None or not smaller, else n of them drawn by `seed`."""
    total = len(images)
    if n is None or n >= total:
        return images.uint8(torch.arange(total))
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return images.uint8(chosen.sort().values)


class ImageDataModule(HeldOutDataModule):
    """Pixel data: batches in [-1, 1], and the uint8 images that FID reference statistics are computed from."""

    def check_reference(self, split: str) -> None:
        check_choice(f"{type(self).__name__} reference split", split, self.full_splits)

    def reference_images(self, split: str = "train", n: int | None = None) -> torch.Tensor:
        """`n` images of the stored `split` ("train", validation images included, or "test") as uint8
        (N, C, H, W): all of them in file order when `n` is None or not smaller, else a subset drawn by `seed`."""
        self.check_reference(split)
        return draw_images(self.full_splits[split], n, self.seed)  # type: ignore[arg-type]  # _load gives ImageDatasets


# ---------------------------------------------------------------------------------------------------------
# Fashion-MNIST

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


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (Xiao et al. 2017): 28×28 grayscale, 10 classes, 60,000 training and 10,000 test images.

    Without `root` it looks in /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist), then in
    `cache_dir()`/fashion-mnist, and downloads into the latter when `download` is on and it is online.
    """

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

    def _directory(self) -> Path | None:
        return _first_complete(self._candidates(), FASHION_MNIST_NAMES)

    def _missing(self, why: str = "") -> ConfigError:
        return _not_found("Fashion-MNIST", FASHION_MNIST_NAMES, self._candidates(), FASHION_MNIST_HOW, why)

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
        directory = self._directory()
        if directory is None:
            raise self._missing()
        return {split: TensorImageDataset(*arrays) for split, arrays in load_fashion_mnist(directory).items()}


SAMPLE_PATH = Path(__file__).resolve().parents[1] / "tests" / "data" / "fmnist_sample.npz"


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


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"  # what the archive unpacks to
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_NAMES = [name for names in CIFAR10_FILES.values() for name in names]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_HOW = (
    f"Download and unpack {CIFAR10_URL} and pass --data.root FOLDER (the folder holding {CIFAR10_FOLDER}), "
    "or run online with --data.download true."
)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the python version of CIFAR-10: uint8 images (N, 3, 32, 32) and int64 labels."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # the official format is a pickle: read trusted files only
        images = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: not a CIFAR-10 batch ({e!r}); delete it and get the dataset again") from e
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or labels.shape != images.shape[:1]:
        raise ConfigError(f"{path}: data {images.shape} and labels {labels.shape} are not a CIFAR-10 batch")
    return images.reshape(-1, 3, 32, 32), labels


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (Krizhevsky 2009): 32×32 RGB, 10 classes, 50,000 training and 10,000 test images.

    Reads `root`/cifar-10-batches-py (or, without `root`, `cache_dir()`/cifar10/cifar-10-batches-py) and
    downloads the official archive there when `download` is on and it is online.
    """

    def __init__(
        self,
        root: str | None = None,  # folder holding cifar-10-batches-py (or that folder itself); None = the cache
        download: bool = True,  # fetch the official archive into `root` (or the cache) when missing
        batch_size: int = 128,  # examples per batch on each device
        num_workers: int = 0,  # DataLoader worker processes
        seed: int = 0,  # chooses the validation images
        val_size: int = 1000,  # training images held out for validation
        limit_train: int | None = None,  # train on the first N remaining training images only; None = all
    ):
        super().__init__(batch_size, num_workers, seed, val_size, limit_train)
        self.save_hyperparameters()
        self.image_size, self.in_channels, self.num_classes = 32, 3, 10
        self.class_names = list(CIFAR10_CLASSES)
        self.root = Path(root) if root is not None else cache_dir() / "cifar10"
        self.download = download
        if self._directory() is None and not download:
            raise self._missing()

    def _candidates(self) -> list[Path]:
        return [self.root / CIFAR10_FOLDER, self.root]

    def _directory(self) -> Path | None:
        return _first_complete(self._candidates(), CIFAR10_NAMES)

    def _missing(self, why: str = "") -> ConfigError:
        return _not_found("CIFAR-10", CIFAR10_NAMES, self._candidates(), CIFAR10_HOW, why)

    def prepare_data(self) -> None:
        if self._directory() is not None or not self.download:
            return
        archive = self.root / "cifar-10-python.tar.gz"
        try:
            download(CIFAR10_URL, archive)
            with tarfile.open(archive) as tar:
                tar.extractall(self.root, filter="data")
        except (OSError, EOFError, tarfile.TarError) as e:
            raise self._missing(f"Downloading {CIFAR10_URL} into {self.root} failed: {e}") from e
        finally:
            archive.unlink(missing_ok=True)

    def _load(self) -> dict[str, BatchDataset]:
        directory = self._directory()
        if directory is None:
            raise self._missing()
        splits: dict[str, BatchDataset] = {}
        for split, names in CIFAR10_FILES.items():
            images, labels = zip(*(read_cifar_batch(directory / name) for name in names))
            splits[split] = TensorImageDataset(*(torch.from_numpy(np.concatenate(arrays)) for arrays in (images, labels)))
        return splits


# ---------------------------------------------------------------------------------------------------------
# Image folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


# ---------------------------------------------------------------------------------------------------------
# VAE latents

LATENT_KEYS = ("mean", "std", "labels", "shift", "scale", "vae")  # required; optional: num_classes, class_names, image_size


def save_latents(path: str | Path, record: dict[str, Any]) -> Path:
    """Write a latents file: `.pt` (read back memory-mapped) or `.npz`, through a temporary file.

    record: mean, std (N, C, H, W) tensors; labels (N,); shift, scale (C,) (z is normalized to (z − shift) / scale);
    vae (the AutoencoderKL that decodes them); optionally num_classes, class_names and image_size (of the pixels).
    """
    path = Path(path)
    check_choice("latents file suffix", path.suffix, (".pt", ".npz"))
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt":
        torch.save(record, part)
    else:
        with open(part, "wb") as f:
            np.savez(f, **{k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in record.items()})
    os.replace(part, path)
    return path


def load_latents(path: str | Path) -> dict[str, Any]:
    """Read a file written by `save_latents`: tensors for the arrays, str/int/list[str] for the rest."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.path: latents file {path} does not exist (make it with `python -m lit_mpdit prepare-latents`)")
    try:
        if path.suffix == ".pt":
            record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            with np.load(path) as arrays:
                record = {k: arrays[k] for k in arrays.files}
    except (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path}: not a latents file ({e!r})") from e
    missing = [k for k in LATENT_KEYS if k not in record]
    if missing:
        raise ConfigError(f"{path}: latents file lacks {', '.join(missing)} (required: {', '.join(LATENT_KEYS)})")
    out = {k: torch.as_tensor(record[k]) for k in ("mean", "std", "labels", "shift", "scale")}
    out["labels"] = out["labels"].long()
    out["vae"] = str(record["vae"])
    if "num_classes" in record:
        out["num_classes"] = int(record["num_classes"])
    if "image_size" in record:
        out["image_size"] = int(record["image_size"])
    if "class_names" in record:
        out["class_names"] = [str(name) for name in record["class_names"]]
    return out


class LatentsDataModule(HeldOutDataModule):
    """Precomputed VAE posteriors (from `python -m lit_mpdit prepare-latents`): each batch draws fresh latents
    z = mean + std·ε and normalizes them per channel, (z − shift) / scale, with the dataset statistics stored
    beside them. `denormalize` undoes that before the VAE (`vae`) decodes samples."""

    def __init__(
        self,
        path: str,  # a .pt or .npz latents file
        batch_size: int = 128,  # examples per batch on each device
        num_workers: int = 0,  # DataLoader worker processes
        seed: int = 0,  # chooses the validation examples
        val_size: int = 1000,  # training examples held out for validation
        limit_train: int | None = None,  # train on the first N remaining training examples only; None = all
        references: dict[str, str] | None = None,  # FID reference split → class-per-folder tree of real images
    ):
        super().__init__(batch_size, num_workers, seed, val_size, limit_train)
        self.save_hyperparameters()
        record = load_latents(path)
        self.references = dict(references or {})
        for split, folder in self.references.items():
            if not Path(folder).is_dir():
                raise ConfigError(f"data.references.{split}: {folder} is not a directory (expected ROOT/<class>/<image>.png|jpg)")
        mean, std, labels, shift, scale = (record[k] for k in ("mean", "std", "labels", "shift", "scale"))
        n, channels, height, width = mean.shape if mean.ndim == 4 else (-1,) * 4
        shapes_agree = std.shape == mean.shape and labels.shape == (n,) and shift.shape == scale.shape == (channels,)
        if mean.ndim != 4 or height != width or not shapes_agree:
            raise ConfigError(
                f"{path}: mean {tuple(mean.shape)} and std {tuple(std.shape)} must be (N, C, H, H), labels "
                f"{tuple(labels.shape)} (N,), shift {tuple(shift.shape)} and scale {tuple(scale.shape)} (C,)"
            )
        self.image_size, self.in_channels = height, channels
        self.pixel_size = record.get("image_size", 8 * height)  # side of the images the latents encode
        self.num_classes = record.get("num_classes", int(labels.max()) + 1)
        self.class_names = record.get("class_names", [str(i) for i in range(self.num_classes)])
        self.vae = record["vae"]
        self.shift, self.scale = shift.float(), scale.float()
        self._record = record
        self._vae: dict[torch.device, Any] = {}

    def _load(self) -> dict[str, BatchDataset]:
        r = self._record
        return {"train": LatentDataset(r["mean"], r["std"], r["labels"], self.shift, self.scale)}

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized latents (N, C, H, W) → the VAE's latent space (before its own scaling factor)."""
        return z * self.scale.view(-1, 1, 1).to(z) + self.shift.view(-1, 1, 1).to(z)

    def check_reference(self, split: str) -> None:
        if split not in self.references:
            raise ConfigError(
                f"data.references: FID compares samples with real images, and reference split {split!r} has none; "
                f"give data.references.{split}: a class-per-folder tree (e.g. ImageNet's validation images); "
                f"given: {', '.join(map(repr, self.references)) or 'none'}"
            )

    def reference_source(self, split: str) -> str:
        self.check_reference(split)
        folder = Path(self.references[split]).resolve()
        digest = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
        return f"{folder.name}-{digest}-{self.pixel_size}px"

    def reference_images(self, split: str = "val", n: int | None = None) -> torch.Tensor:
        """`n` real images of reference split `split` (a folder of `references`), cropped and resized as the
        training images were before encoding, as uint8 (N, 3, H, W); a subset drawn by `seed` when n is smaller."""
        self.check_reference(split)
        files, labels, _ = scan_image_folder(self.references[split], option=f"data.references.{split}")
        return draw_images(ImageFileDataset(files, torch.tensor(labels), self.pixel_size, channels=3), n, self.seed)

    @torch.no_grad()
    def to_images(self, samples: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Generated normalized latents → uint8 images, decoded by the VAE that encoded the training set."""
        from lit_mpdit.latents import load_vae

        vae = self._vae.get(samples.device)
        if vae is None:  # loaded once per device: decoding is called for every evaluation
            vae = self._vae[samples.device] = load_vae(self.vae, str(samples.device))
        decoded = [vae.decode(self.denormalize(z.float())).sample for z in samples.split(batch_size)]
        return to_uint8(torch.cat(decoded))


DATAMODULES: dict[str, type[HeldOutDataModule]] = {
    "fashion_mnist": FashionMNISTDataModule,
    "fashion_mnist_sample": FashionMNISTSampleDataModule,
    "cifar10": CIFAR10DataModule,
    "image_folder": ImageFolderDataModule,
    "latents": LatentsDataModule,
}


def build_datamodule(name: str, **kwargs: Any) -> HeldOutDataModule:
    """The data module registered as `name` (a key of DATAMODULES), built with `kwargs`."""
    check_choice("data", name, DATAMODULES)
    return DATAMODULES[name](**kwargs)


def datamodule_name(datamodule: L.LightningDataModule) -> str:
    """The registry name of a data module (reference statistics are cached under it)."""
    return next((name for name, cls in DATAMODULES.items() if type(datamodule) is cls), type(datamodule).__name__)


def instantiate_datamodule(class_path: str, init_args: dict[str, Any], option: str) -> HeldOutDataModule:
    """The data module `class_path` ("package.module.Class") built with `init_args`, as LightningCLI builds it."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{option}: cannot import data module {class_path!r} ({e})") from None
    return cls(**init_args)


def reference_name(datamodule: HeldOutDataModule, split: str) -> str:
    """Names the reference images `datamodule.reference_images(split, n)` gives, for the FID cache: the data
    module and split, their source folder when not the stored split, and the seed that draws a subset when it
    is not the default 0."""
    source = datamodule.reference_source(split)
    seed = f":seed{datamodule.seed}" if datamodule.seed else ""
    return f"{datamodule_name(datamodule)}:{split}{':' + source if source else ''}{seed}"
