"""Data modules: shapes, ranges and labels of batches, the held-out split, and every way a dataset can be missing."""
from __future__ import annotations

import gzip
import json
import pickle
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from PIL import Image

from lit_mpdit import data
from lit_mpdit.data import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    FashionMNISTSampleDataModule,
    ImageFolderDataModule,
    LatentsDataModule,
    held_out_split,
    reference_name,
    save_latents,
)
from lit_mpdit.errors import ConfigError

SAMPLE = np.load(data.SAMPLE_PATH)


def check_batch(x: torch.Tensor, y: torch.Tensor, shape: tuple[int, ...], num_classes: int) -> None:
    assert x.dtype == torch.float32 and x.shape[1:] == shape
    assert y.dtype == torch.int64 and y.shape == x.shape[:1]
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert 0 <= y.min() and y.max() < num_classes


# ---------------------------------------------------------------------------------------------------------
# The committed sample and the split every module shares


def test_sample_file_is_small_balanced_and_uint8():
    assert data.SAMPLE_PATH.stat().st_size < 2_000_000
    for split, per_class in (("train", 200), ("test", 50)):
        images, labels = SAMPLE[f"{split}_images"], SAMPLE[f"{split}_labels"]
        assert images.dtype == np.uint8 and images.shape == (10 * per_class, 28, 28)
        assert np.bincount(labels).tolist() == [per_class] * 10


def test_sample_datamodule_batches():
    dm = FashionMNISTSampleDataModule(batch_size=32, val_size=100)
    assert (dm.image_size, dm.in_channels, dm.num_classes) == (28, 1, 10)
    assert len(dm.class_names) == 10 and dm.class_names[-1] == "Ankle boot"
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        check_batch(*next(iter(loader)), shape=(1, 28, 28), num_classes=10)
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [1900, 100, 500]


def test_batches_are_the_stored_pixels_rescaled():
    dm = FashionMNISTSampleDataModule(val_size=0, batch_size=2000)
    x, y = next(iter(torch.utils.data.DataLoader(dm.dataset("train"), batch_size=2000, collate_fn=data.keep_batch)))
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8)[:, 0], torch.from_numpy(SAMPLE["train_images"]))
    assert torch.equal(y, torch.from_numpy(SAMPLE["train_labels"]).long())


def test_single_items_match_batches():
    dataset = FashionMNISTSampleDataModule().dataset("train")
    x, y = dataset[5]
    xb, yb = dataset.__getitems__([5, 6])
    assert torch.equal(x, xb[0]) and y == yb[0]


def test_split_is_disjoint_complete_and_set_by_seed():
    train, val = held_out_split(100, 10, seed=0, limit_train=None)
    assert len(val) == 10 and sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert torch.equal(val, held_out_split(100, 10, seed=0, limit_train=None)[1])
    assert not torch.equal(val, held_out_split(100, 10, seed=1, limit_train=None)[1])


def test_split_is_deterministic_in_the_datamodule():
    def val_images(seed: int) -> torch.Tensor:
        return FashionMNISTSampleDataModule(seed=seed, val_size=50).dataset("val").images

    assert torch.equal(val_images(0), val_images(0))
    assert not torch.equal(val_images(0), val_images(1))


def test_limit_train_keeps_the_first_images_and_the_same_validation():
    full = FashionMNISTSampleDataModule(val_size=100)
    limited = FashionMNISTSampleDataModule(val_size=100, limit_train=64)
    assert len(limited.dataset("train")) == 64
    assert torch.equal(limited.dataset("train").images, full.dataset("train").images[:64])
    assert torch.equal(limited.dataset("val").images, full.dataset("val").images)


@pytest.mark.parametrize(
    ("option", "kwargs"),
    [
        ("val_size", {"val_size": 2000}),
        ("val_size", {"val_size": -1}),
        ("batch_size", {"batch_size": 0}),
        ("limit_train", {"limit_train": 0}),
    ],
)
def test_bad_sizes_name_the_option(option, kwargs):
    with pytest.raises(ConfigError, match=f"data.{option}"):
        FashionMNISTSampleDataModule(**kwargs).setup()


def test_reference_images_are_uint8_deterministic_subsets():
    dm = FashionMNISTSampleDataModule()
    refs = dm.reference_images("test", 64)
    assert refs.dtype == torch.uint8 and refs.shape == (64, 1, 28, 28)
    assert torch.equal(refs, FashionMNISTSampleDataModule().reference_images("test", 64))
    assert dm.reference_images("train").shape == (2000, 1, 28, 28)  # validation images included
    with pytest.raises(ConfigError, match="'val'"):
        dm.reference_images("val", 8)


def test_reference_subsets_drawn_by_another_seed_are_cached_under_another_name():
    default, other = FashionMNISTSampleDataModule(), FashionMNISTSampleDataModule(seed=1)
    assert not torch.equal(default.reference_images("test", 64), other.reference_images("test", 64))
    assert reference_name(default, "test") == "fashion_mnist_sample:test"  # the name earlier caches were written under
    assert reference_name(other, "test") == "fashion_mnist_sample:test:seed1"


def test_sample_missing_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="make_fmnist_sample.py"):
        FashionMNISTSampleDataModule(path=str(tmp_path / "nope.npz"))


def test_trains_under_lightning_with_worker_processes():
    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(28 * 28, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.head(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.training_step(batch, batch_idx))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Probe(), datamodule=FashionMNISTSampleDataModule(batch_size=16, num_workers=1, val_size=32))
    assert trainer.global_step == 3 and "val_loss" in trainer.callback_metrics


# ---------------------------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_folder(tmp_path) -> Path:
    """The sample written as the four IDX .gz files of Fashion-MNIST."""
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for split, (image_file, label_file) in data.FASHION_MNIST_FILES.items():
        write_idx(folder / image_file, SAMPLE[f"{split}_images"])
        write_idx(folder / label_file, SAMPLE[f"{split}_labels"])
    return folder


@pytest.fixture
def nowhere(tmp_path, monkeypatch) -> list[Path]:
    """No system copy and an empty cache: the places the loaders look in."""
    monkeypatch.setattr(data.fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")  # where the loader reads it
    monkeypatch.setenv("LIT_MPDIT_CACHE", str(tmp_path / "cache"))
    return [tmp_path / "system", tmp_path / "cache" / "fashion-mnist"]


def test_fashion_mnist_from_idx_files(idx_folder):
    dm = FashionMNISTDataModule(root=str(idx_folder), download=False, val_size=100, batch_size=50)
    check_batch(*next(iter(dm.train_dataloader())), shape=(1, 28, 28), num_classes=10)
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [1900, 100, 500]
    assert torch.equal(dm.reference_images("test")[:, 0], torch.from_numpy(SAMPLE["test_images"]))


def test_fashion_mnist_reads_a_torchvision_root(idx_folder, tmp_path):
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.parent.mkdir(parents=True)
    idx_folder.rename(raw)
    dm = FashionMNISTDataModule(root=str(tmp_path / "tv"), download=False, val_size=10)
    assert len(dm.dataset("test")) == 500


def test_fashion_mnist_finds_the_cache(idx_folder, nowhere):
    nowhere[1].parent.mkdir()
    idx_folder.rename(nowhere[1])
    assert len(FashionMNISTDataModule(download=False, val_size=10).dataset("test")) == 500


def test_fashion_mnist_missing_names_every_place_and_the_remedy(nowhere):
    with pytest.raises(ConfigError) as error:
        FashionMNISTDataModule(download=False)
    message = str(error.value)
    assert all(str(place) in message for place in nowhere)
    assert "apt-get install dataset-fashion-mnist" in message and "--data.root" in message


def test_fashion_mnist_missing_root_is_not_searched_elsewhere(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "empty")):
        FashionMNISTDataModule(root=str(tmp_path / "empty"), download=False)


def test_fashion_mnist_downloads_into_the_cache(idx_folder, nowhere, monkeypatch):
    monkeypatch.setattr(data.fashion_mnist, "FASHION_MNIST_URL", idx_folder.as_uri() + "/")
    dm = FashionMNISTDataModule(val_size=10)
    dm.prepare_data()
    assert sorted(p.name for p in nowhere[1].iterdir()) == sorted(data.FASHION_MNIST_NAMES)
    assert len(dm.dataset("train")) == 1990


def test_fashion_mnist_failed_download_is_a_config_error(tmp_path, nowhere, monkeypatch):
    monkeypatch.setattr(data.fashion_mnist, "FASHION_MNIST_URL", (tmp_path / "offline").as_uri() + "/")
    dm = FashionMNISTDataModule()  # download=True: constructing is fine, fetching fails
    with pytest.raises(ConfigError, match="Downloading .*train-images-idx3-ubyte.gz"):
        dm.prepare_data()
    assert not any(nowhere[1].glob("*.part"))


def corrupt_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_magic(path: Path) -> None:
    write_idx(path, np.zeros((2, 28, 28), np.uint8))
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[2] = 0x0D  # float data
    path.write_bytes(gzip.compress(bytes(raw), compresslevel=1))


def corrupt_length(path: Path) -> None:
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100], compresslevel=1))  # a valid gzip of a short IDX file


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_magic, corrupt_length])
@pytest.mark.parametrize("name", ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
def test_fashion_mnist_corrupt_file_is_named_before_it_is_read(idx_folder, corrupt, name):
    corrupt(idx_folder / name)
    with pytest.raises(ConfigError, match=name):
        FashionMNISTDataModule(root=str(idx_folder), download=False, val_size=10)


def test_fashion_mnist_corrupt_bytes_are_named_when_read(idx_folder):
    path = idx_folder / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # the sizes still agree: found by the gzip checksum on reading
    path.write_bytes(bytes(raw))
    dm = FashionMNISTDataModule(root=str(idx_folder), download=False, val_size=10)
    with pytest.raises(ConfigError, match="t10k-images-idx3-ubyte.gz: unreadable"):
        dm.setup()


@pytest.mark.skipif(not data.FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_from_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_MPDIT_CACHE", str(tmp_path))
    dm = FashionMNISTDataModule(download=False)
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [59_000, 1000, 10_000]
    check_batch(*next(iter(dm.test_dataloader())), shape=(1, 28, 28), num_classes=10)


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10 from (fake) pickled batches


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    """A CIFAR-10 tree in the official format, 8 images per batch."""
    folder = tmp_path / "cifar" / data.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in data.CIFAR10_NAMES:
        batch = {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), b"labels": list(range(8))}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder.parent


def test_cifar10_from_batches(cifar_root):
    dm = CIFAR10DataModule(root=str(cifar_root), download=False, val_size=4, batch_size=16)
    assert (dm.image_size, dm.in_channels, dm.num_classes) == (32, 3, 10)
    check_batch(*next(iter(dm.train_dataloader())), shape=(3, 32, 32), num_classes=10)
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [36, 4, 8]
    first = pickle.loads((cifar_root / data.CIFAR10_FOLDER / "data_batch_1").read_bytes())[b"data"][0]
    assert torch.equal(dm.reference_images("train")[0], torch.from_numpy(first.reshape(3, 32, 32)))


def test_cifar10_missing_names_the_places(tmp_path):
    with pytest.raises(ConfigError, match="CIFAR-10 not found") as error:
        CIFAR10DataModule(root=str(tmp_path), download=False)
    assert str(tmp_path / data.CIFAR10_FOLDER) in str(error.value) and "--data.root" in str(error.value)


def test_cifar10_corrupt_batch_is_named(cifar_root):
    corrupt_truncate(cifar_root / data.CIFAR10_FOLDER / "data_batch_3")
    with pytest.raises(ConfigError, match="data_batch_3"):
        CIFAR10DataModule(root=str(cifar_root), download=False, val_size=4).setup()


def test_cifar10_downloads_and_unpacks(cifar_root, tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_root / data.CIFAR10_FOLDER, arcname=data.CIFAR10_FOLDER)
    monkeypatch.setattr(data.cifar10, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setenv("LIT_MPDIT_CACHE", str(tmp_path / "cache"))
    dm = CIFAR10DataModule(val_size=4)
    dm.prepare_data()
    assert len(dm.dataset("test")) == 8 and not list((tmp_path / "cache" / "cifar10").glob("*.tar.gz"))


# ---------------------------------------------------------------------------------------------------------
# Image folders


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """Three classes of PNG and JPEG images of assorted sizes: white in their central square, black outside."""
    root = tmp_path / "images"
    for label, name in enumerate(["dog", "ant", "cat"]):
        for i, (height, width) in enumerate([(10, 30), (24, 12), (16, 16)]):
            pixels = np.zeros((height, width, 3), np.uint8)
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            pixels[top : top + side, left : left + side] = 255
            folder = root / name / ("nested" if i == 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}", quality=100)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_batches(image_tree, channels):
    dm = ImageFolderDataModule(root=str(image_tree), image_size=8, channels=channels, val_size=2, batch_size=16)
    assert (dm.image_size, dm.in_channels, dm.num_classes) == (8, channels, 3)
    assert dm.class_names == ["ant", "cat", "dog"]
    x, y = next(iter(dm.train_dataloader()))
    check_batch(x, y, shape=(channels, 8, 8), num_classes=3)
    assert len(x) == 7 and x.min() > 0.9  # the central square, resized: the black margins are cropped away


def test_image_folder_labels_follow_sorted_class_names(image_tree):
    dm = ImageFolderDataModule(root=str(image_tree), image_size=8, val_size=0)
    assert dm.dataset("train").labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert dm.reference_images(n=4).shape == (4, 3, 8, 8)
    with pytest.raises(ConfigError, match="'test'"):
        dm.test_dataloader()


def test_image_folder_missing_or_empty_root(tmp_path):
    with pytest.raises(ConfigError, match="data.root: .* is not a directory"):
        ImageFolderDataModule(root=str(tmp_path / "missing"))
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(ConfigError, match="data.root: no PNG or JPEG images"):
        ImageFolderDataModule(root=str(tmp_path / "empty"))


def test_image_folder_unreadable_image_is_named(image_tree):
    (image_tree / "ant" / "broken.png").write_bytes(b"not a png")
    dm = ImageFolderDataModule(root=str(image_tree), image_size=8, val_size=0, batch_size=16)
    with pytest.raises(ConfigError, match="broken.png"):
        next(iter(dm.train_dataloader()))


def test_image_folder_bad_channels():
    with pytest.raises(ConfigError, match="data.channels"):
        ImageFolderDataModule(root=".", channels=2)


# ---------------------------------------------------------------------------------------------------------
# Latents


def latent_record(n: int = 12, std: float = 0.0, **extra) -> dict:
    mean = torch.arange(n * 4 * 2 * 2, dtype=torch.float32).view(n, 4, 2, 2) / 10
    record = {
        "mean": mean.half(),
        "std": torch.full_like(mean, std),
        "labels": torch.arange(n) % 3,
        "shift": torch.tensor([1.0, 2.0, 3.0, 4.0]),
        "scale": torch.tensor([0.5, 1.0, 2.0, 4.0]),
        "vae": "stabilityai/sd-vae-ft-mse",
    }
    return record | extra


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_latents_are_normalized_posterior_means_when_std_is_zero(tmp_path, suffix):
    record = latent_record()
    dm = LatentsDataModule(path=str(save_latents(tmp_path / f"z{suffix}", record)), val_size=0, batch_size=100)
    assert (dm.image_size, dm.in_channels, dm.num_classes, dm.vae) == (2, 4, 3, "stabilityai/sd-vae-ft-mse")
    x, y = dm.dataset("train").__getitems__(list(range(12)))
    expected = (record["mean"].float() - record["shift"].view(-1, 1, 1)) / record["scale"].view(-1, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x, expected)
    assert torch.equal(y, record["labels"]) and torch.allclose(dm.denormalize(x), record["mean"].float())


def test_latents_draw_fresh_noise_and_keep_stored_metadata(tmp_path):
    record = latent_record(std=1.0, num_classes=5, class_names=list("abcde"), image_size=16)
    dm = LatentsDataModule(path=str(save_latents(tmp_path / "z.npz", record)), val_size=2)
    assert dm.num_classes == 5 and dm.class_names == list("abcde")
    train = dm.dataset("train")
    assert not torch.equal(train[0][0], train[0][0])
    assert [len(dm.dataset(s)) for s in ("train", "val")] == [10, 2]
    assert dm.dataset("train").mean.data_ptr() == dm.dataset("val").mean.data_ptr()  # subsets share, never copy


def test_latents_missing_key_or_bad_shape(tmp_path):
    record = latent_record()
    del record["shift"]
    with pytest.raises(ConfigError, match="lacks shift"):
        LatentsDataModule(path=str(save_latents(tmp_path / "a.pt", record)))
    with pytest.raises(ConfigError, match="must be"):
        LatentsDataModule(path=str(save_latents(tmp_path / "b.pt", latent_record(scale=torch.ones(3)))))
    with pytest.raises(ConfigError, match="prepare-latents"):
        LatentsDataModule(path=str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------------------------------------------------
# Every registered module, built as the CLI builds it


@pytest.fixture
def registry_args(idx_folder, cifar_root, image_tree, tmp_path) -> dict[str, dict]:
    return {
        "fashion_mnist": {"root": str(idx_folder), "download": False, "val_size": 10},
        "fashion_mnist_sample": {"val_size": 10},
        "cifar10": {"root": str(cifar_root), "download": False, "val_size": 4},
        "image_folder": {"root": str(image_tree), "image_size": 8, "val_size": 2},
        "latents": {"path": str(save_latents(tmp_path / "z.pt", latent_record())), "val_size": 2},
    }


@pytest.mark.parametrize("name", list(data.DATAMODULES))
def test_every_datamodule_builds_through_jsonargparse(name, registry_args):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    spec = {"class_path": f"lit_mpdit.data.{data.DATAMODULES[name].__name__}", "init_args": registry_args[name]}
    dm = parser.instantiate_classes(parser.parse_args(["--data", json.dumps(spec)])).data
    assert isinstance(dm, data.DATAMODULES[name])
    assert all(isinstance(getattr(dm, a), int) for a in ("image_size", "in_channels", "num_classes"))
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape[1:] == (dm.in_channels, dm.image_size, dm.image_size)
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < dm.num_classes


def test_build_datamodule_rejects_unknown_names():
    with pytest.raises(ConfigError, match="allowed: 'fashion_mnist'"):
        data.build_datamodule("mnist")


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_every_global_batch_of_one_process(world):
    from lit_mpdit.data import EpochShuffle

    n, batch = 50, 4
    alone = list(EpochShuffle(n, seed=3, batch_size=batch * world))
    ranks = [list(EpochShuffle(n, seed=3, batch_size=batch, rank=r, world=world)) for r in range(world)]
    steps = n // (batch * world)
    assert all(len(r) == steps * batch == len(EpochShuffle(n, 3, batch, 0, world)) for r in ranks)
    for step in range(steps):
        glued = [i for r in ranks for i in r[step * batch : (step + 1) * batch]]
        assert glued == alone[step * batch * world : (step + 1) * batch * world]
    resumed = EpochShuffle(n, seed=3, batch_size=batch, rank=1, world=world)
    resumed.skip_once(2)  # two batches of every rank already consumed
    assert list(resumed) == ranks[1][2 * batch :]
