"""`make bench`: training and sampling throughput, FLOP efficiency and memory, as JSON and Markdown.

Ratios are measured in one run on one machine, against the matmul peak measured in the same run,
because absolute times on shared machines are noise. Writes results/bench/latest.json and latest.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from lit_mpdit.conditioning import NAMED_STRATEGIES
from lit_mpdit.cost import forward_gflops, n_params
from lit_mpdit.module import DiffusionModule

SETTINGS = {  # name: (size, input_size, channels, classes, batches)
    "C/4 fmnist": ("C/4", 28, 1, 10, (128,)),
    "S/4 latents": ("S/4", 16, 4, 1000, (32, 128)),
}
PRECISIONS = {"fp32": None, "bf16-mixed": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n×n product, the best of `repeats`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_step_seconds(module: DiffusionModule, batch: int, dtype, steps: int) -> float:
    cfg = module.net.cfg
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    y = torch.randint(0, cfg.num_classes, (batch,))
    opt = module.configure_optimizers()["optimizer"]

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = module.losses(x, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocator, kernels
    return sorted(_timed(step) for _ in range(steps))[steps // 2]  # the median step


def sample_images_per_second(module: DiffusionModule, batch: int, dtype, steps: int = 4) -> float:
    labels = torch.arange(batch) % module.hparams.num_classes
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        module.sample(labels[:2], steps=1)
        seconds = _timed(lambda: module.sample(labels, steps=steps, guidance=1.5))
    return batch / (seconds / steps)  # images per second per sampling step (with guidance: 2 passes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed training steps per configuration (median)")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--quick", action="store_true", help="adaln and rotation+scale only, fp32 only")
    args = p.parse_args(argv)

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    strategies = ["adaln", "rotation+scale"] if args.quick else list(NAMED_STRATEGIES)
    precisions = {"fp32": None} if args.quick else PRECISIONS
    rows = []
    for setting, (size, input_size, channels, classes, batches) in SETTINGS.items():
        for conditioning in strategies:
            for mp in "AE":
                torch.manual_seed(0)
                module = DiffusionModule(size=size, conditioning=conditioning, mp=mp, input_size=input_size, in_channels=channels, num_classes=classes)
                gflops = forward_gflops(module.net)
                for batch in batches:
                    for precision, dtype in precisions.items():
                        seconds = train_step_seconds(module, batch, dtype, args.steps)
                        achieved = 3 * gflops * batch / seconds  # forward + backward ≈ 3 forward passes
                        rows.append({
                            "setting": setting, "size": size, "conditioning": conditioning, "mp": mp, "batch": batch,
                            "precision": precision, "params": n_params(module.net), "gflops_per_image": gflops,
                            "train_step_s": seconds, "train_images_per_s": batch / seconds,
                            "achieved_gflops_per_s": achieved, "fraction_of_peak": achieved / peaks["bf16" if dtype else "fp32"],
                            "sample_images_per_s": sample_images_per_second(module, min(batch, 64), dtype),
                            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        })  # fmt: skip
                        print(json.dumps(rows[-1]), flush=True)

    def step_time(**match):
        hits = [r["train_step_s"] for r in rows if all(r[k] == v for k, v in match.items())]
        return hits[0] if hits else None

    ratios = {}
    for setting, (_, _, _, _, batches) in SETTINGS.items():
        for batch in batches:
            for mp in "AE":
                base = step_time(setting=setting, batch=batch, mp=mp, conditioning="adaln", precision="fp32")
                ratios[f"{setting} b{batch} rung {mp}: rotation+scale / adaln"] = step_time(setting=setting, batch=batch, mp=mp, conditioning="rotation+scale", precision="fp32") / base
            ratios[f"{setting} b{batch} adaln: rung E / rung A"] = step_time(setting=setting, batch=batch, mp="E", conditioning="adaln", precision="fp32") / step_time(setting=setting, batch=batch, mp="A", conditioning="adaln", precision="fp32")
            bf16 = step_time(setting=setting, batch=batch, mp="A", conditioning="adaln", precision="bf16-mixed")
            if bf16:
                ratios[f"{setting} b{batch} adaln A: bf16 speed-up"] = step_time(setting=setting, batch=batch, mp="A", conditioning="adaln", precision="fp32") / bf16
    report = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": torch.get_num_threads(), "arch": platform.machine(), "torch": torch.__version__},
        "matmul_peak_gflops_per_s": peaks,
        "ratios": ratios,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Benchmark {report['date_utc']}", "", f"matmul peak: fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s", ""]
    lines += [f"- {k}: {v:.3f}" for k, v in ratios.items()] + ["", "| setting | strategy | rung | batch | precision | train img/s | % of peak | sample img/s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['conditioning']} | {r['mp']} | {r['batch']} | {r['precision']} | {r['train_images_per_s']:.0f} | {100 * r['fraction_of_peak']:.0f} | {r['sample_images_per_s']:.0f} |" for r in rows]
    (out / "latest.md").write_text("\n".join(lines) + "\n")
    print(out / "latest.md")


if __name__ == "__main__":
    main()
