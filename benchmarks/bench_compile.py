"""Training steps eager against compiled (`--model.compile true`), fp32 against bf16-mixed, rung A against rung E,
for the cpu profile's model and the paper's S/4 on latents: the ratios of the speed issue, from one run.

    python benchmarks/bench_compile.py [--settings "T/4 fmnist" "S/4 latents"] [--strategies adaln ...] [--rounds 5] [--out results/bench]

Writes results/bench/compile.json and compile.md. One fresh process per setting, with an empty inductor cache,
so every compile time is a cold one (the first cell of a (strategy, rung) in a sweep pays it; cells after it
in the same clone find the kernels cached on disk). Every configuration of a setting is built and compiled
first, then all are timed in interleaved rounds, and the fastest round counts.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from lit_mpdit.conditioning import NAMED_STRATEGIES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import SETTINGS, Config, bf16_note, default_precisions, precision_peaks, profile_precision, run_header, timed, write_report  # noqa: E402

BENCH_SETTINGS = {"T/4 fmnist": 128, "S/4 latents": 32, "T/4 tiny": 4}  # setting: batch (the cpu profile's; the S/4 b32; tests)
DEFAULT_SETTINGS = ("T/4 fmnist", "S/4 latents")
RUNGS = ("A", "E")
VARIANTS = [("fp32", False), ("bf16-mixed", False), ("fp32", True), ("bf16-mixed", True)]  # (precision, compiled)
CELL_STEPS = 2000  # the cpu profile's steps, for the compile's share of a cell
TARGETS = {  # the speed issue's done-means
    "rung E / rung A step time": ("≤", 1.05),
    "bf16-mixed speed-up over fp32": ("≥", 1.8),
    "cpu profile's training / eager fp32, compile included": ("≥", 1.3),
}


def bench_setting(setting: str, batch: int, strategies: list[str], rounds: int, precisions: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold: nothing compiled by an earlier run
        torch._dynamo.config.cache_size_limit = 64  # eight compiled models of one class in one process
        configs = [Config(setting, c, mp, batch, precision, compiled=compiled, optimizer="paper") for mp in RUNGS for c in strategies for precision, compiled in VARIANTS if precision in precisions]
        first = {id(c): timed(c.step) for c in configs}  # compiles forward and backward, or warms the allocator and oneDNN
        best = {id(c): float("inf") for c in configs}
        for _ in range(rounds):
            for config in configs:
                best[id(config)] = min(best[id(config)], timed(config.step))
        return [
            {**config.key, "compiled": config.compiled, "step_s": best[id(config)], "images_per_s": batch / best[id(config)],
             "compile_s": first[id(config)] - best[id(config)] if config.compiled else 0.0}
            for config in configs
        ]  # fmt: skip


def ratios(rows: list[dict], profile: str) -> list[dict]:
    """The targets' ratios; the cell target is about `profile`, the cpu profile's training precision."""
    index = {(r["setting"], r["conditioning"], r["mp"], r["precision"], r["compiled"]): r for r in rows}
    out: list[dict] = []

    def add(name: str, where: str, value: float):
        op, goal = TARGETS[name]
        out.append({"target": name, "where": where, "value": value, "goal": f"{op} {goal}", "met": value <= goal if op == "≤" else value >= goal})

    for (setting, conditioning, mp, precision, compiled), r in index.items():
        mode = "compiled" if compiled else "eager"
        if mp == "E":
            add("rung E / rung A step time", f"{setting} {conditioning} {precision} {mode}", r["step_s"] / index[setting, conditioning, "A", precision, compiled]["step_s"])
        if precision == "bf16-mixed":
            add("bf16-mixed speed-up over fp32", f"{setting} {conditioning} rung {mp} {mode}", index[setting, conditioning, mp, "fp32", compiled]["step_s"] / r["step_s"])
        if compiled and precision == profile:
            eager = index[setting, conditioning, mp, "fp32", False]["step_s"] * CELL_STEPS
            where = f"{setting} {conditioning} rung {mp} {precision}, {CELL_STEPS} steps"
            add("cpu profile's training / eager fp32, compile included", where, eager / (r["step_s"] * CELL_STEPS + r["compile_s"]))
    return out


def markdown(report: dict) -> str:
    lines = [
        f"# Compiled training, {report['date_utc']}",
        "",
        f"`{report['command']}` on {report['threads']} threads, torch {report['torch']}; fastest of {report['rounds']} interleaved rounds; "
        f"compile times cold (an empty inductor cache). The cell ratio is {CELL_STEPS} measured steps plus the compile, against "
        f"{CELL_STEPS} eager fp32 steps: training only (a cell's evaluation is benchmarks/bench_eval.py's).",
        "",
        *bf16_note(report, report["precisions"], report["matmul_peak_gflops_per_s"]),
        "| target | where | value | goal | met |",
        "|---|---|---|---|---|",
        *(f"| {t['target']} | {t['where']} | {t['value']:.3f} | {t['goal']} | {'yes' if t['met'] else '**no**'} |" for t in report["targets"]),
        "",
        "| setting | strategy | rung | precision | mode | step ms | images/s | compile s |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['setting']} b{r['batch']} | {r['conditioning']} | {r['mp']} | {r['precision']} | {'compiled' if r['compiled'] else 'eager'} | "
            f"{1e3 * r['step_s']:.0f} | {r['images_per_s']:.0f} | {r['compile_s']:.0f} |"
            for r in report["rows"]
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=list(BENCH_SETTINGS))
    p.add_argument("--strategies", nargs="+", default=list(NAMED_STRATEGIES), choices=list(NAMED_STRATEGIES))
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (the fastest counts)")
    p.add_argument("--precisions", nargs="+", default=None, choices=[p for p, _ in VARIANTS[:2]], help="default: both where bf16 is native, else fp32")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    precisions = args.precisions or default_precisions()
    rows = []
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        for setting in args.settings:
            rows += pool.submit(bench_setting, setting, BENCH_SETTINGS[setting], args.strategies, args.rounds, precisions).result()
    report = {
        **run_header("bench_compile.py", argv),
        "rounds": args.rounds,
        "precisions": precisions,
        "profile_precision": profile_precision(),
        "matmul_peak_gflops_per_s": precision_peaks(),
        "targets": ratios(rows, profile_precision()),
        "rows": rows,
    }
    return write_report(out / "compile", report, markdown(report))


if __name__ == "__main__":
    assert all(s in SETTINGS for s in BENCH_SETTINGS)
    main()
