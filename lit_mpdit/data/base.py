"""What every data source shares: the datasets that build a whole batch in one call (`BatchDataset`, and
`ImageDataset`/`TensorImageDataset` for uint8 images in memory) with their `keep_batch` collate_fn, the
held-out validation split (`held_out_split`), the per-epoch sampler that resumes exactly (`EpochShuffle`),
the data module every source subclasses (`HeldOutDataModule`, and `ImageDataModule` for pixel data) with
`draw_images` for FID references, and the download and not-found helpers the sources use.
"""
from __future__ import annotations

import os
import shutil
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
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


class PublishedDataModule(ImageDataModule):
    """A dataset whose published files are read from the first folder of `_candidates()` that holds all of
    them (or downloaded by `prepare_data`); a subclass names them, and says how to get them when they are nowhere."""

    dataset_name: str  # in messages
    file_names: Sequence[str]  # every file the folder must hold
    how_to_get: str  # how to get the files, for the message when they are nowhere

    @abstractmethod
    def _candidates(self) -> list[Path]:
        """The folders to look in, in order."""

    def _directory(self) -> Path | None:
        return next((d for d in self._candidates() if all((d / n).is_file() for n in self.file_names)), None)

    def _missing(self, why: str = "") -> ConfigError:
        places = "\n".join(f"  {p}" for p in self._candidates())
        reason = f"\n{why}" if why else ""
        return ConfigError(f"{self.dataset_name} not found: looked for {', '.join(self.file_names)} in\n{places}{reason}\n{self.how_to_get}")

    def _require_directory(self) -> Path:
        directory = self._directory()
        if directory is None:
            raise self._missing()
        return directory
