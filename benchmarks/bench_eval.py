"""The cost of one FID evaluation of the cpu profile, part by part: the sampler (fp32 against bf16 autocast,
eager against compiled), the Inception features, and the bootstrap interval (the direct formula against
`resampled_fids`).

    python benchmarks/bench_eval.py [--profile cpu] [--rounds 2] [--no-compile] [--out results/bench]

Writes results/bench/eval.json and eval.md. Each pair is timed in interleaved rounds and the fastest round
counts (other processes only ever slow a round down); the ratios come from this one run. The model is the
profile's on 28×28×1 images of 10 classes (the Fashion-MNIST profiles), untrained: sampling and feature costs
do not depend on the weights.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the profiles live in the repository's ablations/

from ablations.cells import load_profile  # noqa: E402
from lit_mpdit.evaluate import balanced_labels  # noqa: E402
from lit_mpdit.metrics.fid import InceptionFeatures, load_images  # noqa: E402
from lit_mpdit.metrics.frechet import frechet_distance, resampled_fids  # noqa: E402
from lit_mpdit.module import DiffusionModule  # noqa: E402
from lit_mpdit.runtime import keep_freed_memory  # noqa: E402
from run import default_precisions, run_header, timed, write_report  # noqa: E402  (benchmarks/run.py: this script's folder is on the path)


def fastest(fns: dict[str, object], rounds: int) -> dict[str, float]:
    """Seconds of each function, the best of `rounds` interleaved calls."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn))
    return best


def sampler_speed(profile: dict, images: int, steps: int, rounds: int, compile: bool) -> dict:
    """Images per second of the profile's sampler over its full step count (guidance: two passes per step), on
    one batch of the size the FID set is drawn in; eager in each precision, and compiled in the faster one."""
    ev, model = profile["eval"], profile["fit"]["model"]
    torch.manual_seed(0)
    module = DiffusionModule(size=model["size"], input_size=28, in_channels=1, num_classes=10)
    labels = balanced_labels(images, 10)

    def run(precision: str, compiled: bool = False):
        def draw():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                module.sample(labels, steps=steps, sampler=ev["sampler"], guidance=ev["guidance"], compile=compiled)

        return draw

    run("fp32")()  # warm-up: kernels, allocator
    precisions = [p.removesuffix("-mixed") for p in default_precisions()]  # bf16 only where native: else it times the emulation
    variants = {p: run(p) for p in precisions}
    seconds = fastest(variants, 1)
    compile_s = None
    if compile:
        best = min(seconds, key=seconds.get)
        variants[f"{best} compiled"] = run(best, compiled=True)
        compile_s = timed(variants[f"{best} compiled"])  # the first call compiles (one batch shape: one graph)
    seconds = fastest(variants, rounds)
    per_image = {k: v / images * ev["steps"] / steps for k, v in seconds.items()}  # at the profile's steps
    compiled = next((k for k in per_image if k.endswith(" compiled")), None)
    return {
        "model": model["size"],
        "sampler": f"{ev['sampler']} {ev['steps']} steps, guidance {ev['guidance']}",
        "images_timed": images,
        "steps_timed": steps,
        "images_per_s": {k: 1 / v for k, v in per_image.items()},
        "seconds_for_n_fake": {k: v * ev["n_fake"] for k, v in per_image.items()},
        "bf16_speedup": per_image["fp32"] / per_image["bf16"] if "bf16" in per_image else None,
        "compiled_speedup": per_image[compiled.removesuffix(" compiled")] / per_image[compiled] if compiled else None,
        "compile_s": compile_s - seconds[compiled] if compiled else None,  # the first call's time beyond a steady one
    }


def inception_speed(profile: dict, images: int, rounds: int) -> dict:
    ev = profile["eval"]
    net = InceptionFeatures(ev["precision"])
    batch = load_images("fashion_mnist:test", images)
    net(batch[:8])
    seconds = fastest({"features": lambda: net(batch)}, rounds)["features"]
    return {"precision": ev["precision"], "images_per_s": images / seconds, "seconds_for_n_fake": seconds / images * ev["n_fake"]}


def bootstrap_speed(profile: dict, draws: int, rounds: int) -> dict:
    """Seconds per resample at the profile's set sizes, on random features of Inception's width (the cost does
    not depend on the values), and the largest disagreement of the two formulas over the draws."""
    ev = profile["eval"]
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(ev["n_ref"], 2048, generator=generator).relu()
    fake = torch.randn(ev["n_fake"], 2048, generator=generator).relu() + 0.1
    indices = [torch.randint(ev["n_fake"], (ev["n_fake"],), generator=generator) for _ in range(draws)]
    direct = [frechet_distance(real, fake[i]) for i in indices]
    fast = resampled_fids(real, fake, indices)
    seconds = fastest({"direct": lambda: [frechet_distance(real, fake[i]) for i in indices], "resampled_fids": lambda: resampled_fids(real, fake, indices)}, rounds)
    per_draw = {k: v / draws for k, v in seconds.items()}
    return {
        "n_ref": ev["n_ref"],
        "n_fake": ev["n_fake"],
        "draws_timed": draws,
        "seconds_per_draw": per_draw,
        "seconds_for_bootstrap": {k: v * ev["bootstrap"] for k, v in per_draw.items()},
        "speedup": per_draw["direct"] / per_draw["resampled_fids"],
        "max_relative_difference": max(abs(a - b) / abs(a) for a, b in zip(direct, fast)),
    }


def markdown(report: dict) -> str:
    s, i, b = report["sampler"], report["inception"], report["bootstrap"]
    n = report["n_fake"]
    lines = [
        f"# One FID evaluation of profile `{report['profile']}`, part by part ({report['date_utc']})",
        "",
        f"`{report['command']}` on {report['threads']} threads, torch {report['torch']}; fastest of interleaved rounds.",
        "",
        "| part | variant | images/s | seconds for the FID set |",
        "|---|---|---|---|",
        f"| sampler ({s['model']}, {s['sampler']}) | fp32 | {s['images_per_s']['fp32']:.1f} | {s['seconds_for_n_fake']['fp32']:.0f} ({n} images) |",
        *([f"| | bf16 autocast | {s['images_per_s']['bf16']:.1f} | {s['seconds_for_n_fake']['bf16']:.0f} |"] if s["bf16_speedup"] else []),
        *[f"| | {k} (torch.compile) | {v:.1f} | {s['seconds_for_n_fake'][k]:.0f} + {s['compile_s']:.0f} compiling |" for k, v in s["images_per_s"].items() if k.endswith(" compiled")],
        f"| Inception features | {i['precision']} | {i['images_per_s']:.1f} | {i['seconds_for_n_fake']:.0f} |",
        f"| bootstrap ({report['bootstrap_resamples']} resamples, {b['n_fake']} vs {b['n_ref']}) | direct formula | | {b['seconds_for_bootstrap']['direct']:.0f} |",
        f"| | `resampled_fids` | | {b['seconds_for_bootstrap']['resampled_fids']:.0f} |",
        "",
        f"- bf16 sampling: {s['bf16_speedup']:.2f}× fp32." if s["bf16_speedup"] else "- bf16 sampling not timed: this CPU has no native bf16 (`lit_mpdit.runtime.native_bf16`).",
        f"- compiled sampling: {s['compiled_speedup']:.2f}× eager, after {s['compile_s']:.0f} s of compiling (once per batch shape and process)."
        if s["compiled_speedup"]
        else "- compiled sampling not timed (--no-compile).",
        f"- sampler timed on one batch of {s['images_timed']} images at {s['steps_timed']} steps, scaled to the profile's steps.",
        f"- bootstrap: {b['speedup']:.1f}× the direct formula; the two agree to {b['max_relative_difference']:.1e} (relative, worst draw).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also time the compiled sampler")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)
    profile = load_profile(args.profile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()
    report = {
        **run_header("bench_eval.py", argv),
        "profile": args.profile,
        "n_fake": profile["eval"]["n_fake"],
        "bootstrap_resamples": profile["eval"]["bootstrap"],
        # one batch as the FID set's are drawn (`DiffusionModule.sample`'s 256 at most)
        "sampler": sampler_speed(profile, images=min(profile["eval"]["n_fake"], 256), steps=10, rounds=args.rounds, compile=args.compile),
        "inception": inception_speed(profile, images=100, rounds=args.rounds),
        "bootstrap": bootstrap_speed(profile, draws=8, rounds=args.rounds),
    }
    return write_report(out / "eval", report, markdown(report))


if __name__ == "__main__":
    main()
