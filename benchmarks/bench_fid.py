"""FID Inception on CPU: images/s of the plain fp32 TorchScript against faster paths, and what they do to FID.

    python benchmarks/bench_fid.py [--n 500] [--speed-images 64] [--rounds 3]

Prints one JSON object. Speeds are the best of `rounds` interleaved passes over the same images, because on a
shared machine the other processes only ever slow a pass down. FIDs compare two pairs of disjoint real sets
(`--real` against `--other`, and two halves of `--real`) through each path's features (the float64
`frechet_distance`); relative changes are against the fp32 TorchScript path.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

from lit_mpdit.metrics.fid import InceptionFeatures, load_images
from lit_mpdit.metrics.frechet import frechet_distance


BASELINE = "fp32 (TorchScript forward, NCHW)"
FAST = "bf16, fp32 first conv, channels-last (precision='bf16')"


def plain_fp32(net: InceptionFeatures) -> Callable[[torch.Tensor], torch.Tensor]:
    """The TorchScript's own forward in fp32, NCHW: the baseline."""

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([net.net(net.preprocess(batch)) for batch in images.split(net.batch_size)])

    return features


def standard_paths(batch_size: int, names: tuple[str, ...] | None = None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The baseline first, then the suite's fast path (`precision="bf16"`) and the variants it was chosen from;
    `names` keeps only those (each network is built only when kept)."""
    builders: dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]] = {
        BASELINE: lambda: plain_fp32(InceptionFeatures("fp32", channels_last=False, batch_size=batch_size)),
        "fp32, channels-last": lambda: InceptionFeatures("fp32", channels_last=True, batch_size=batch_size),
        FAST: lambda: InceptionFeatures("bf16", batch_size=batch_size),
        "bf16, every layer, channels-last": lambda: InceptionFeatures("bf16", batch_size=batch_size, fp32_layers=()),
        "bf16, fp32 first three convs, channels-last": lambda: InceptionFeatures(
            "bf16", batch_size=batch_size, fp32_layers=("conv", "conv_1", "conv_2")
        ),
    }
    return {name: build() for name, build in builders.items() if names is None or name in names}


def measure(paths: dict[str, Callable], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], timed: torch.Tensor, rounds: int, batch_size: int) -> dict:
    """Speeds (best of interleaved rounds) and FIDs of every path; changes relative to the first path."""
    baseline = next(iter(paths))
    load_before = os.getloadavg()
    for fn in paths.values():
        fn(timed[:batch_size])  # warm-up: oneDNN builds its kernels per shape and layout
    best = dict.fromkeys(paths, 0.0)
    for _ in range(rounds):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn(timed)
            best[name] = max(best[name], len(timed) / (time.perf_counter() - start))
    load_after = os.getloadavg()

    fids: dict[str, dict[str, float]] = {pair: {} for pair in pairs}
    errors: dict[str, float] = {}
    for name, fn in paths.items():
        feats = {pair: (fn(a), fn(b)) for pair, (a, b) in pairs.items()}
        for pair, (fa, fb) in feats.items():
            fids[pair][name] = frechet_distance(fa, fb)
        flat = torch.cat([torch.cat(ab) for ab in feats.values()])
        if name == baseline:
            reference = flat
        errors[name] = float((flat - reference).norm() / reference.norm())
    return {
        "images_per_s": {k: round(v, 2) for k, v in best.items()},
        "speedup_vs_fp32": {k: round(v / best[baseline], 2) for k, v in best.items()},
        "fid": {pair: {k: round(v, 4) for k, v in values.items()} for pair, values in fids.items()},
        "fid_relative_change_pct": {
            pair: {k: round(100 * (v / values[baseline] - 1), 3) for k, v in values.items()} for pair, values in fids.items()
        },
        "feature_relative_error": {k: round(v, 5) for k, v in errors.items()},
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", default="fashion_mnist:test", help="one real set (image set spec)")
    p.add_argument("--other", default="fashion_mnist:train", help="another real set")
    p.add_argument("--n", type=int, default=500, help="images per set for the FID comparison")
    p.add_argument("--speed-images", type=int, default=64, help="images per timed pass")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per path (the best counts)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    halves = load_images(args.real, 2 * args.n)
    pairs = {  # two disjoint real sets each: FID is all small-sample bias here, which is what precision perturbs
        f"{args.real} vs {args.other}": (load_images(args.real, args.n), load_images(args.other, args.n)),
        f"{args.real}, two halves": (halves[: args.n], halves[args.n :]),
    }
    result = measure(standard_paths(args.batch_size), pairs, halves[: args.speed_images], args.rounds, args.batch_size)
    print(json.dumps({**result, "n_per_set": args.n}, indent=1))


if __name__ == "__main__":
    main()
