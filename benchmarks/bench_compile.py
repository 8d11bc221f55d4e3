"""Training steps eager against compiled (`--model.compile true` or a torch.compile mode), fp32 against bf16-mixed,
rung A against rung E, for the cpu profile's model and the paper's S/4 on latents: the ratios of the speed issue,
from one run, and where the compiled step's time goes.

    python benchmarks/bench_compile.py [--settings "T/4 fmnist" "S/4 latents"] [--strategies adaln ...] [--modes default ...] [--rounds 10] [--out results/bench]

Writes results/bench/compile.json and compile.md. One fresh process per setting, with an empty inductor cache:
the setting's first configuration compiles cold, later ones reuse the kernels they share with earlier ones, as
the cells of a sweep do (inductor's cache is on disk; a cell after the first of its (strategy, rung) compiles
warm). Every configuration of a setting is built and compiled first, then all are timed in interleaved rounds,
and the fastest round counts. Then torch.profiler splits a step of the first strategy's rungs A and E, eager and
compiled in the profile's precision, into matrix products, attention, inductor's fused kernels, the optimizer
and the rest: what bounds the compiled cell.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lit_mpdit.conditioning import NAMED_STRATEGIES
from lit_mpdit.module import COMPILE_MODES, compile_mode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import SETTINGS, Config, bf16_note, default_precisions, precision_peaks, profile_precision, run_header, timed, write_report  # noqa: E402

BENCH_SETTINGS = {"T/4 fmnist": 128, "S/4 latents": 32, "T/4 tiny": 4}  # setting: batch (the cpu profile's; the S/4 b32; tests)
DEFAULT_SETTINGS = ("T/4 fmnist", "S/4 latents")
RUNGS = ("A", "E")
PRECISIONS = ("fp32", "bf16-mixed")
CELL_STEPS = 2000  # the cpu profile's steps, for the compile's share of a cell
TARGETS = {  # the speed issue's done-means
    "rung E / rung A step time": ("≤", 1.05),
    "bf16-mixed speed-up over fp32": ("≥", 1.8),
    "cpu profile's training / eager fp32, compile included": ("≥", 1.3),
}
PARTS = ("matrix products", "attention", "fused kernels (inductor)", "optimizer", "rest")  # of a profiled step
PROFILED_STEPS = 3


def part(op: str) -> str:
    """The part of a training step a profiled op's self time belongs to."""
    if op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return PARTS[0]
    if "scaled_dot_product" in op:
        return PARTS[1]
    if op.startswith("## Call CompiledFxGraph"):  # inductor's generated kernels run inside this call
        return PARTS[2]
    if "adam" in op.lower() or op.startswith("Optimizer."):
        return PARTS[3]
    return PARTS[4]


def step_parts(config: Config) -> dict[str, float]:
    """Seconds per step in each of PARTS (self CPU time, averaged over PROFILED_STEPS steps)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILED_STEPS):
            config.step()
    totals: Counter[str] = Counter()
    for event in prof.key_averages():
        totals[part(event.key)] += event.self_cpu_time_total / 1e6 / PROFILED_STEPS
    return {name: totals[name] for name in PARTS}


def mode_name(compiled: bool | str) -> str:
    """`eager`, or the torch.compile mode (`default` for `--model.compile true`)."""
    return compile_mode(compiled) or "eager"


def label(mode: str) -> str:
    """A mode as the reports name it: eager, compiled (the default mode), or compiled with its mode."""
    return mode if mode == "eager" else "compiled" if mode == "default" else f"compiled {mode}"


def bench_setting(setting: str, batch: int, strategies: list[str], rounds: int, precisions: list[str], modes: list[str], profiled: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold: nothing compiled by an earlier run
        torch._dynamo.config.cache_size_limit = 64  # eight compiled models of one class in one process
        variants = [(precision, compiled) for compiled in (False, *modes) for precision in precisions]
        configs = [Config(setting, c, mp, batch, precision, compiled=compiled, optimizer="paper") for mp in RUNGS for c in strategies for precision, compiled in variants]
        first = {id(c): timed(c.step) for c in configs}  # compiles forward and backward, or warms the allocator and oneDNN
        best = {id(c): float("inf") for c in configs}
        for _ in range(rounds):
            for config in configs:
                best[id(config)] = min(best[id(config)], timed(config.step))
        parts = {
            id(c): step_parts(c) for c in configs
            if c.key["conditioning"] == strategies[0] and c.key["precision"] == profiled and mode_name(c.compiled) in ("eager", modes[0])
        }
        return [
            {**config.key, "compiled": config.compiled is not False, "mode": mode_name(config.compiled), "step_s": best[id(config)],
             "images_per_s": batch / best[id(config)], "compile_s": first[id(config)] - best[id(config)] if config.compiled else 0.0,
             "parts_s": parts.get(id(config))}
            for config in configs
        ]  # fmt: skip


def ratios(rows: list[dict], profile: str) -> list[dict]:
    """The targets' ratios; the cell target is about `profile`, the cpu profile's training precision. The cell
    target's `bound` is its ratio if everything but the matrix products cost nothing, where the step was profiled."""
    index = {(r["setting"], r["conditioning"], r["mp"], r["precision"], r["mode"]): r for r in rows}
    out: list[dict] = []

    def add(name: str, where: str, value: float, bound: float | None = None):
        op, goal = TARGETS[name]
        met = value <= goal if op == "≤" else value >= goal
        out.append({"target": name, "where": where, "value": value, "goal": f"{op} {goal}", "met": met, "bound": bound})

    for (setting, conditioning, mp, precision, mode), r in index.items():
        if mp == "E":
            add("rung E / rung A step time", f"{setting} {conditioning} {precision} {label(mode)}", r["step_s"] / index[setting, conditioning, "A", precision, mode]["step_s"])
        if precision == "bf16-mixed":
            add("bf16-mixed speed-up over fp32", f"{setting} {conditioning} rung {mp} {label(mode)}", index[setting, conditioning, mp, "fp32", mode]["step_s"] / r["step_s"])
        if r["compiled"] and precision == profile:
            eager = index[setting, conditioning, mp, "fp32", "eager"]["step_s"] * CELL_STEPS
            where = f"{setting} {conditioning} rung {mp} {precision} {label(mode)}, {CELL_STEPS} steps"
            parts = r["parts_s"]
            bound = None if parts is None else eager / (parts[PARTS[0]] * CELL_STEPS + r["compile_s"])
            add("cpu profile's training / eager fp32, compile included", where, eager / (r["step_s"] * CELL_STEPS + r["compile_s"]), bound)
    return out


def markdown(report: dict) -> str:
    lines = [
        f"# Compiled training, {report['date_utc']}",
        "",
        f"`{report['command']}` on {report['threads']} threads, torch {report['torch']}; fastest of {report['rounds']} interleaved rounds; "
        f"compile times from an inductor cache emptied for each setting (its first configuration compiles cold; later ones reuse "
        f"the kernels they share, as a sweep's later cells do). The cell ratio is {CELL_STEPS} measured steps plus the compile, against "
        f"{CELL_STEPS} eager fp32 steps: training only (a cell's evaluation is benchmarks/bench_eval.py's).",
        "",
        *bf16_note(report, report["precisions"], report["matmul_peak_gflops_per_s"]),
        "`bound`: the cell ratio if every part of the compiled step but its matrix products cost nothing (profiled below).",
        "",
        "| target | where | value | goal | met | bound |",
        "|---|---|---|---|---|---|",
        *(
            f"| {t['target']} | {t['where']} | {t['value']:.3f} | {t['goal']} | {'yes' if t['met'] else '**no**'} | {'' if t.get('bound') is None else format(t['bound'], '.2f')} |"
            for t in report["targets"]
        ),
        "",
        "| setting | strategy | rung | precision | mode | step ms | images/s | compile s |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['setting']} b{r['batch']} | {r['conditioning']} | {r['mp']} | {r['precision']} | {label(r['mode'])} | "
            f"{1e3 * r['step_s']:.0f} | {r['images_per_s']:.0f} | {r['compile_s']:.0f} |"
            for r in report["rows"]
        ),
        "",
        f"Where a step's time goes (torch.profiler, self time per op, mean of {PROFILED_STEPS} steps after the timing rounds; ms per step):",
        "",
        f"| setting | strategy | rung | precision | mode | {' | '.join(PARTS)} | matrix products' share |",
        "|---|---|---|---|---|" + "---|" * (len(PARTS) + 1),
        *(
            f"| {r['setting']} b{r['batch']} | {r['conditioning']} | {r['mp']} | {r['precision']} | {label(r['mode'])} | "
            + " | ".join(f"{1e3 * r['parts_s'][p]:.0f}" for p in PARTS)
            + f" | {r['parts_s'][PARTS[0]] / sum(r['parts_s'].values()):.0%} |"
            for r in report["rows"]
            if r["parts_s"] is not None
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=list(BENCH_SETTINGS))
    p.add_argument("--strategies", nargs="+", default=list(NAMED_STRATEGIES), choices=list(NAMED_STRATEGIES))
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (the fastest counts; 5 left ratios at S/4 3-4%% apart between runs)")
    p.add_argument("--precisions", nargs="+", default=None, choices=PRECISIONS, help="default: both where bf16 is native, else fp32")
    p.add_argument("--modes", nargs="+", default=["default"], choices=COMPILE_MODES, help="torch.compile modes to time (the first is profiled); default = `--model.compile true`")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    precisions = args.precisions or default_precisions()
    rows, profiled = [], profile_precision()
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        for setting in args.settings:
            rows += pool.submit(bench_setting, setting, BENCH_SETTINGS[setting], args.strategies, args.rounds, precisions, args.modes, profiled).result()
    report = {
        **run_header("bench_compile.py", argv),
        "rounds": args.rounds,
        "precisions": precisions,
        "modes": args.modes,
        "profile_precision": profiled,
        "matmul_peak_gflops_per_s": precision_peaks(),
        "targets": ratios(rows, profiled),
        "rows": rows,
    }
    return write_report(out / "compile", report, markdown(report))


if __name__ == "__main__":
    assert all(s in SETTINGS for s in BENCH_SETTINGS)
    main()
