"""Rebuild tests/data/fmnist_sample.npz: a class-balanced sample of Fashion-MNIST, so tests never need the dataset.

200 training and 50 test images per class, drawn with a fixed seed from the IDX files of Debian's
dataset-fashion-mnist (or any folder holding the four files), kept in file order.

    python tests/data/make_fmnist_sample.py [--root /usr/share/datasets/fashion-mnist]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lit_mpdit.data import FASHION_MNIST_SYSTEM_DIR, SAMPLE_PATH, load_fashion_mnist

PER_CLASS = {"train": 200, "test": 50}
SEED = 0


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` indices of every class, drawn without replacement, in file order."""
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=FASHION_MNIST_SYSTEM_DIR, help="folder with the four IDX .gz files")
    parser.add_argument("--out", type=Path, default=SAMPLE_PATH)
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    arrays = {}
    for split, (images, labels) in load_fashion_mnist(args.root).items():
        keep = balanced_indices(labels.numpy(), PER_CLASS[split], rng)
        arrays[f"{split}_images"] = images[keep, 0].numpy()  # (N, 28, 28) uint8
        arrays[f"{split}_labels"] = labels[keep].numpy().astype(np.uint8)
    np.savez_compressed(args.out, **arrays)
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.2f} MB, " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
