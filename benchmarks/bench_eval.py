"""The cost of one FID evaluation of the cpu profile, part by part: the sampler (fp32 against bf16 autocast,
eager against compiled), the Inception features, and the bootstrap interval (the direct formula against
`resampled_fids`). With --ckpts, also which cheaper protocol measures the same FID.

    python benchmarks/bench_eval.py [--profile cpu] [--rounds 2] [--no-compile] [--out results/bench]
    python benchmarks/bench_eval.py --ckpts CKPT [CKPT ...] [--protocols ddpm:50 dpm++2m:20 ...] [--cell DIR]

Writes results/bench/eval.json and eval.md. Each pair is timed in interleaved rounds and the fastest round
counts (other processes only ever slow a round down); the ratios come from this one run. The model is the
profile's on 28×28×1 images of 10 classes (the Fashion-MNIST profiles), untrained: sampling and feature costs
do not depend on the weights.

Protocols (--ckpts): every trained checkpoint is scored with each SAMPLER:STEPS, the first being the profile's
own, everything else the profile's protocol (same noise seed, same reference features). A cheaper protocol
agrees when its FID lies inside the first's 95% bootstrap interval on every checkpoint; only such a one may
replace the profile's. A committed cell (--cell, its result.json) gives the share of a cell's wall time spent
outside training steps, as run and as it would be with each protocol's evaluations (its FID curve and final
set scaled by the protocol's measured evaluation time against the first's).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the profiles live in the repository's ablations/

from ablations.cells import load_profile  # noqa: E402
from lit_mpdit.errors import ConfigError, check_choice  # noqa: E402
from lit_mpdit.evaluate import Protocol, balanced_labels, evaluate, load_for_evaluation  # noqa: E402
from lit_mpdit.metrics.fid import DATASETS, InceptionFeatures, load_images  # noqa: E402
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


def parse_protocol(spec: str) -> dict:
    """SAMPLER:STEPS[:compile] as Protocol fields."""
    from lit_mpdit.diffusion import SAMPLERS

    sampler, steps, *rest = spec.split(":") + [""]
    if not steps.isdigit() or rest not in ([""], ["compile", ""]):
        raise ConfigError(f"--protocols: {spec!r} is not SAMPLER:STEPS[:compile], e.g. ddpm:50:compile")
    check_choice("--protocols", sampler, SAMPLERS)
    return {"sampler": sampler, "steps": int(steps), "compile": rest[0] == "compile"}


def non_training_share(seconds: dict, evaluation_ratio: float = 1.0) -> float:
    """A cell's share of wall time outside training steps, its FID evaluations (curve and final) scaled."""
    saved = (seconds["fid_curve"] + seconds["final_evaluation"]) * (1 - evaluation_ratio)
    return 1 - seconds["training_steps"] / (seconds["wall"] - saved)


def protocol_agreement(profile: dict, ckpts: list[str], specs: list[str], cell: str | None) -> dict:
    """Each checkpoint's FID under each protocol (paired: same noise seed and reference), the first the reference."""
    base = Protocol(**profile["eval"])
    split = base.reference_split
    rows = []
    for ckpt in ckpts:
        module = load_for_evaluation(ckpt, base, None)  # the protocols differ in the sampler only: one load
        for spec in specs:
            protocol = dataclasses.replace(base, **parse_protocol(spec))
            result = evaluate(module, f"fashion_mnist:{split}", lambda: DATASETS["fashion_mnist"]().reference_images(split, base.n_ref), protocol)
            rows.append({"ckpt": ckpt, "protocol": spec, **{k: result[k] for k in ("fid", "fid_lo", "fid_hi")}, "seconds": result["seconds"]})
            print(f"[bench_eval] {ckpt}: {spec}: FID {result['fid']:.2f} [{result['fid_lo']:.2f}, {result['fid_hi']:.2f}] in {result['seconds']['total']:.0f} s", flush=True)
    reference = {r["ckpt"]: r for r in rows if r["protocol"] == specs[0]}
    for r in rows:
        ref = reference[r["ckpt"]]
        r["vs_reference_pct"] = 100 * (r["fid"] / ref["fid"] - 1)
        r["inside_reference_interval"] = ref["fid_lo"] <= r["fid"] <= ref["fid_hi"]
    seconds = json.loads((Path(cell) / "result.json").read_text())["seconds"] if cell else None
    summary = []
    for spec in specs:
        mine = [r for r in rows if r["protocol"] == spec]
        ratio = sum(r["seconds"]["total"] - r["seconds"]["reference"] for r in mine) / sum(r["seconds"]["total"] - r["seconds"]["reference"] for r in reference.values())
        summary.append({
            "protocol": spec,
            "agrees": all(r["inside_reference_interval"] for r in mine),
            "mean_abs_vs_reference_pct": sum(abs(r["vs_reference_pct"]) for r in mine) / len(mine),
            "evaluation_time_vs_reference": ratio,  # reference features excluded: cached after a cell's first evaluation
            "cell_non_training_share": non_training_share(seconds, ratio) if seconds else None,
        })  # fmt: skip
    return {"protocols": specs, "precision": base.precision, "sample_precision": base.sample_precision, "cell": cell, "rows": rows, "summary": summary}


def run_name(ckpt: str) -> str:
    """The run a checkpoint belongs to: the folder holding its checkpoints/ (else the file's name)."""
    path = Path(ckpt)
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def protocol_markdown(report: dict) -> list[str]:
    p = report["protocols"]
    lines = [
        "",
        f"## A cheaper protocol? Paired FID-{report['n_fake']} on trained checkpoints",
        "",
        f"The profile's protocol but for the sampler (same noise seed, reference features, guidance; Inception "
        f"{p['precision']}, sampling {p['sample_precision']}). Reference: `{p['protocols'][0]}`. A protocol agrees when "
        "its FID lies inside the reference's 95% bootstrap interval on every checkpoint.",
        "",
        "| checkpoint | protocol | FID [95% bootstrap] | vs reference | inside its interval | evaluation s |",
        "|---|---|---|---|---|---|",
        *(f"| {run_name(r['ckpt'])} | {r['protocol']} | {r['fid']:.2f} [{r['fid_lo']:.2f}, {r['fid_hi']:.2f}] | {r['vs_reference_pct']:+.1f}% | "
          f"{'yes' if r['inside_reference_interval'] else 'no'} | {r['seconds']['total'] - r['seconds']['reference']:.0f} |" for r in p["rows"]),
        "",
        "| protocol | agrees on every checkpoint | mean abs. change | evaluation time vs reference | a cell's non-training share |",
        "|---|---|---|---|---|",
        *(f"| {s['protocol']} | {'yes' if s['agrees'] else '**no**'} | {s['mean_abs_vs_reference_pct']:.1f}% | {s['evaluation_time_vs_reference']:.2f}× | "
          + (f"{100 * s['cell_non_training_share']:.0f}%" if s["cell_non_training_share"] is not None else "–") + " |" for s in p["summary"]),
    ]  # fmt: skip
    if p["cell"]:
        lines += ["", f"The share is the committed cell `{p['cell']}`'s (its result.json), its FID curve and final evaluation scaled by the evaluation time."]
    return lines


def markdown(report: dict) -> str:
    if "sampler" not in report:  # --ckpts --no-parts
        return "\n".join([f"# FID protocols of profile `{report['profile']}` ({report['date_utc']})", "", f"`{report['command']}` on {report['threads']} threads, torch {report['torch']}.", *protocol_markdown(report)]) + "\n"
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
        *(protocol_markdown(report) if "protocols" in report else []),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also time the compiled sampler")
    p.add_argument("--parts", action=argparse.BooleanOptionalAction, default=True, help="time the parts of one evaluation")
    p.add_argument("--ckpts", nargs="*", default=[], help="trained Fashion-MNIST checkpoints to score with each of --protocols")
    p.add_argument("--protocols", nargs="+", default=["ddpm:50", "dpm++2m:25", "dpm++2m:15", "dpm++2m:10"], help="SAMPLER:STEPS[:compile]; the first is the reference")
    p.add_argument("--cell", default=None, help="a committed cell folder whose result.json gives the non-training share")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)
    profile = load_profile(args.profile)
    [parse_protocol(s) for s in args.protocols]  # bad input fails before any work
    if args.cell and not (Path(args.cell) / "result.json").is_file():
        raise ConfigError(f"--cell: no result.json in {args.cell}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()
    report = {**run_header("bench_eval.py", argv), "profile": args.profile, "n_fake": profile["eval"]["n_fake"], "bootstrap_resamples": profile["eval"]["bootstrap"]}
    if args.parts:
        report |= {
            # one batch as the FID set's are drawn (`DiffusionModule.sample`'s 256 at most)
            "sampler": sampler_speed(profile, images=min(profile["eval"]["n_fake"], 256), steps=10, rounds=args.rounds, compile=args.compile),
            "inception": inception_speed(profile, images=100, rounds=args.rounds),
            "bootstrap": bootstrap_speed(profile, draws=8, rounds=args.rounds),
        }
    if args.ckpts:
        report["protocols"] = protocol_agreement(profile, args.ckpts, args.protocols, args.cell)
    return write_report(out / "eval", report, markdown(report))


if __name__ == "__main__":
    main()
