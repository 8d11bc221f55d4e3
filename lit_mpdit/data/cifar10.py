"""CIFAR-10: the reader of the python version's pickled batches (`read_cifar_batch`) and
`CIFAR10DataModule`, which reads them from a folder or the cache and downloads the official archive, with
their constants.
"""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from lit_mpdit.data.base import BatchDataset, PublishedDataModule, TensorImageDataset, cache_dir, download
from lit_mpdit.errors import ConfigError

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


class CIFAR10DataModule(PublishedDataModule):
    """CIFAR-10 (Krizhevsky 2009): 32×32 RGB, 10 classes, 50,000 training and 10,000 test images.

    Reads `root`/cifar-10-batches-py (or, without `root`, `cache_dir()`/cifar10/cifar-10-batches-py) and
    downloads the official archive there when `download` is on and it is online.
    """

    dataset_name, file_names, how_to_get = "CIFAR-10", CIFAR10_NAMES, CIFAR10_HOW

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
        directory = self._require_directory()
        splits: dict[str, BatchDataset] = {}
        for split, names in CIFAR10_FILES.items():
            images, labels = zip(*(read_cifar_batch(directory / name) for name in names))
            splits[split] = TensorImageDataset(*(torch.from_numpy(np.concatenate(arrays)) for arrays in (images, labels)))
        return splits
