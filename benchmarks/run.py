"""`make bench`: training and sampling speed, FLOP efficiency and memory of every strategy and rung; FID
feature extraction speed; the wall time of one `cpu`-profile ablation cell. Writes results/bench/latest.json
and latest.md.

Times on a shared machine are noise plus signal, and noise only ever adds: every configuration of one
(setting, batch, precision) group is built first, then timed in interleaved rounds, and the fastest round
counts. Ratios come from one run, against the matmul peak measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from lit_mpdit.conditioning import NAMED_STRATEGIES
from lit_mpdit.cost import forward_gflops, n_params
from lit_mpdit.module import DiffusionModule
from lit_mpdit.runtime import keep_freed_memory, matmul_gflops, native_bf16

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: (size, input_size, channels, classes, batches)
    "C/4 fmnist": ("C/4", 28, 1, 10, (128,)),  # the first CPU default
    "T/4 fmnist": ("T/4", 28, 1, 10, (128,)),  # the cpu ablation profile's model and configs/fmnist.yaml's
    "S/4 latents": ("S/4", 16, 4, 1000, (32, 128)),  # the paper's S/4 on 128-px ImageNet latents
    "T/4 tiny": ("T/4", 8, 1, 10, (4,)),  # for tests of this script only
}
DEFAULT_SETTINGS = ("T/4 fmnist", "S/4 latents")
PRECISIONS = {"fp32": None, "bf16-mixed": torch.bfloat16}
RUNGS = ("A", "E")
TARGETS = {  # what issue 5 asks of the ratios
    "rotation+scale / adaln step time": ("≤", 0.97),
    "rung E / rung A step time": ("≤", 1.10),
    "S/4 b32 fp32 fraction of matmul peak": ("≥", 0.60),
    "bf16-mixed speed-up over fp32": ("≥", 1.8),
    "FID extraction speed-up": ("≥", 2.0),
    "FID change, |%|": ("≤", 0.5),
    "per-head gains / one shared gain step time": ("≤", 1.02),  # the faithful-models issue: no measurable cost
}


# ----------------------------------------------------------------------------
# Measurements.


def allocation_ms(numel: int = 11_000_000, repeats: int = 10) -> float:
    """Milliseconds to create a fresh weight-sized tensor (S/4's modulation head: 42 MB), the best of `repeats`."""
    w, s = torch.randn(numel // 384, 384), torch.randn(numel // 384, 1)
    return 1e3 * min(timed(lambda: w * s) for _ in range(repeats))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_gflops(loss, optimizer: torch.optim.Optimizer) -> float:
    """FLOPs of one forward + backward of `loss()`, counted by torch's FLOP counter (matmuls, attention)."""
    with FlopCounterMode(display=False) as counter:
        loss().backward()
    optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


class Config:
    """One module and its inputs; `step()` is one optimizer step on a fixed batch."""

    def __init__(
        self, setting: str, conditioning: str, mp: str, batch: int, precision: str, gains: str = "per_head", compiled: bool | str = False, optimizer: str = "auto"
    ):
        size, input_size, channels, classes, _ = SETTINGS[setting]
        self.key = {"setting": setting, "size": size, "conditioning": conditioning, "mp": mp, "batch": batch, "precision": precision, "gains": gains}
        torch.manual_seed(0)
        flags = None if gains == "per_head" else {"gains": gains}  # `shared`: the one gain the heads had before
        self.module = DiffusionModule(
            size=size, conditioning=conditioning, mp=mp, flags=flags, input_size=input_size, in_channels=channels, num_classes=classes, compile=compiled, optimizer=optimizer
        )
        self.compiled, self.clip = compiled, self.module.preset().clip
        self.dtype = PRECISIONS[precision]
        self.x = torch.randn(batch, channels, input_size, input_size)
        self.y = torch.randint(0, classes, (batch,))
        self.optimizer = self.module.configure_optimizers()["optimizer"]

    def autocast(self):
        return torch.autocast("cpu", dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def step(self) -> None:
        with self.autocast():
            loss = self.module.losses(self.x, self.y)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:  # the preset's clipping, as Lightning applies it
            torch.nn.utils.clip_grad_norm_(self.module.net.parameters(), self.clip)
        self.optimizer.step()

    def train_gflops(self) -> float:
        def loss() -> torch.Tensor:
            with self.autocast():
                return self.module.losses(self.x, self.y)["loss"]

        return train_gflops(loss, self.optimizer)

    def train_memory_mb(self) -> float:
        """Parameters, gradients and optimizer state, plus every tensor autograd saves for the backward."""
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.autocast():
            loss = self.module.losses(self.x, self.y)["loss"]
        del loss
        state = sum(p.numel() * p.element_size() for p in self.module.net.parameters()) * 4  # + grad, Adam's two moments
        return (state + sum(saved.values())) / 2**20

    def sample_step_images_per_s(self, rounds: int) -> float:
        """Images per second through one guided sampling step (two network passes per image)."""
        labels = self.y[:64]
        with self.autocast():
            self.module.sample(labels[:2], steps=1)
            best = min(timed(lambda: self.module.sample(labels, steps=2, guidance=1.5)) for _ in range(rounds))
        return len(labels) * 2 / best


def bench_group(setting: str, batch: int, precision: str, strategies: list[str], rounds: int, peaks: dict[str, float]) -> list[dict]:
    """Every strategy and rung of one (setting, batch, precision), timed in interleaved rounds."""
    keep_freed_memory()  # as the CLI and the sweep do
    group = [Config(setting, c, mp, batch, precision) for mp in RUNGS for c in strategies]
    group += [Config(setting, c, "E", batch, precision, gains="shared") for c in strategies]
    for config in group:
        config.step()  # warm-up: allocator, oneDNN kernels
    best = {id(c): float("inf") for c in group}
    for _ in range(rounds):
        for config in group:
            best[id(config)] = min(best[id(config)], timed(config.step))
    rows = []
    for config in group:
        seconds, gflops = best[id(config)], config.train_gflops()
        achieved = gflops / seconds
        rows.append({
            **config.key,
            "params": n_params(config.module.net),
            "forward_gflops_per_image": forward_gflops(config.module.net),
            "train_gflops_per_step": gflops,
            "train_step_s": seconds,
            "train_images_per_s": batch / seconds,
            "achieved_gflops_per_s": achieved,
            "fraction_of_peak": achieved / peaks["bf16" if config.dtype else "fp32"],
            "train_memory_mb": config.train_memory_mb(),
            "sample_step_images_per_s": config.sample_step_images_per_s(max(1, rounds // 2)),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_models(settings: list[str], strategies: list[str], precisions: list[str], rounds: int, peaks: dict[str, float]) -> list[dict]:
    """One fresh process per group: ten models' worth of freed memory stays with the allocator of the process
    that freed it (22 GB after four groups in one process), and each group then starts from the same state."""
    groups = [(setting, batch, precision) for setting in settings for batch in SETTINGS[setting][4] for precision in precisions]
    rows = []
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        for group in groups:
            rows += pool.submit(bench_group, *group, strategies, rounds, peaks).result()
    return rows


def bench_fid(n: int, speed_images: int, rounds: int) -> dict:
    """The plain fp32 TorchScript against the suite's default fast path, on real FMNIST test vs train images."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_fid import BASELINE, FAST, measure, standard_paths

    from lit_mpdit.metrics.fid import load_images

    batch = 8
    paths = standard_paths(batch, names=(BASELINE, FAST))
    real, other = load_images("fashion_mnist:test", n), load_images("fashion_mnist:train", n)
    result = measure(paths, {"fashion_mnist test vs train": (real, other)}, real[:speed_images], rounds, batch)
    return {**result, "n_per_set": n, "baseline": BASELINE, "fast": FAST}


def bench_cell(profile: str, cell: str) -> dict:
    """One ablation cell run by the sweep driver as a user runs it, in a fresh process and output folder."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "ablations.sweep", "--profile", profile, "--cells", cell, "--out", out]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        result = json.loads(next(Path(out).glob("**/result.json")).read_text())
    return {"command": " ".join([*command[1:-1], "<temporary folder>"]), "process_wall_s": wall, "train_and_eval_s": result["wall_s"], "fid": result["fid"], "steps": result["steps"]}


# ----------------------------------------------------------------------------
# Ratios against the targets.


def ratios(rows: list[dict], peaks: dict[str, float]) -> list[dict]:
    shared = {tuple(r[k] for k in ("setting", "batch", "precision", "mp", "conditioning")): r for r in rows if r.get("gains") == "shared"}
    index = {tuple(r[k] for k in ("setting", "batch", "precision", "mp", "conditioning")): r for r in rows if r.get("gains", "per_head") == "per_head"}
    out = []

    def add(name: str, where: str, value: float, bound: float | None = None):
        op, target = TARGETS[name]
        met = value <= target if op == "≤" else value >= target
        out.append({"target": name, "where": where, "value": value, "goal": f"{op} {target}", "met": met, **({"flop_bound": bound} if bound else {})})

    for (setting, batch, precision, mp, conditioning), r in index.items():
        where = f"{setting} b{batch} {precision}"
        if conditioning == "rotation+scale" and (base := index.get((setting, batch, precision, mp, "adaln"))):
            # The FLOP ratio is the bound for a compute-bound step: only the head shrinks.
            add("rotation+scale / adaln step time", f"{where} rung {mp}", r["train_step_s"] / base["train_step_s"], r["train_gflops_per_step"] / base["train_gflops_per_step"])
        if mp == "E" and (a := index.get((setting, batch, precision, "A", conditioning))):
            add("rung E / rung A step time", f"{where} {conditioning}", r["train_step_s"] / a["train_step_s"])
        if precision == "bf16-mixed" and (fp32 := index.get((setting, batch, "fp32", mp, conditioning))):
            add("bf16-mixed speed-up over fp32", f"{setting} b{batch} {conditioning} rung {mp}", fp32["train_step_s"] / r["train_step_s"])
        if (one := shared.get((setting, batch, precision, mp, conditioning))) is not None:
            add("per-head gains / one shared gain step time", f"{where} {conditioning} rung {mp}", r["train_step_s"] / one["train_step_s"])
        if setting == "S/4 latents" and batch == 32 and precision == "fp32":
            add("S/4 b32 fp32 fraction of matmul peak", f"{conditioning} rung {mp}", r["fraction_of_peak"])
    return out


def fid_ratios(fid: dict) -> list[dict]:
    speedup = fid["speedup_vs_fp32"][fid["fast"]]
    change = max(abs(v[fid["fast"]]) for v in fid["fid_relative_change_pct"].values())
    return [
        {"target": "FID extraction speed-up", "where": fid["fast"], "value": speedup, "goal": "≥ 2.0", "met": speedup >= 2.0},
        {"target": "FID change, |%|", "where": f"n = {fid['n_per_set']} per set", "value": change, "goal": "≤ 0.5", "met": change <= 0.5},
    ]


# ----------------------------------------------------------------------------
# Report.


def markdown(report: dict) -> str:
    peaks = report["matmul_peak_gflops_per_s"]
    lines = [
        f"# Benchmark {report['date_utc']}",
        "",
        f"`{report['command']}` on {report['machine']['threads']} threads ({report['machine']['arch']}, torch {report['machine']['torch']}); "
        f"matmul peak fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s; load average {report['load_average']}. "
        f"A fresh 42 MB tensor: {report['fresh_42mb_tensor']['system_malloc_ms']:.1f} ms with glibc's defaults, "
        f"{report['fresh_42mb_tensor']['kept_memory_ms']:.1f} ms once freed memory is kept (`lit_mpdit.runtime`; all rows below).",
        "",
        "## Targets",
        "",
        "| target | where | value | goal | met | FLOP-ratio bound |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {t['target']} | {t['where']} | {t['value']:.3f} | {t['goal']} | {'yes' if t['met'] else '**no**'} | {t['flop_bound']:.3f} |"
        if "flop_bound" in t else f"| {t['target']} | {t['where']} | {t['value']:.3f} | {t['goal']} | {'yes' if t['met'] else '**no**'} | |"
        for t in sorted(report["targets"], key=lambda t: t["target"])
    ]
    lines += ["", "## Summary", "", *bf16_note(report["machine"], report.get("precisions", list(PRECISIONS)), peaks), *summary(report["rows"])]
    lines += ["", "## Training and sampling", "", "| setting | strategy | rung | gains | batch | precision | params | train img/s | GFLOP/s | % of peak | train MB | sample-step img/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['setting']} | {r['conditioning']} | {r['mp']} | {r.get('gains', 'per_head')} | {r['batch']} | {r['precision']} | {r['params'] / 1e6:.2f} M | {r['train_images_per_s']:.1f} | "
        f"{r['achieved_gflops_per_s']:.0f} | {100 * r['fraction_of_peak']:.0f} | {r['train_memory_mb']:.0f} | {r['sample_step_images_per_s']:.0f} |"
        for r in report["rows"]
    ]
    if fid := report.get("fid"):
        lines += ["", "## FID feature extraction", "", "| path | images/s | speed-up | FID change % |", "|---|---|---|---|"]
        change = next(iter(fid["fid_relative_change_pct"].values()))
        lines += [f"| {k} | {v:.1f} | {fid['speedup_vs_fp32'][k]:.2f} | {change[k]:+.3f} |" for k, v in fid["images_per_s"].items()]
    if cell := report.get("cell"):
        lines += ["", "## One ablation cell", "", f"`{cell['command']}`: {cell['process_wall_s']:.0f} s in all, {cell['train_and_eval_s']:.0f} s training and evaluation ({cell['steps']} steps), FID {cell['fid']:.1f}."]
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> list[str]:
    """One line per (setting, batch, precision): adaln's speed, and the ratios the targets are about."""
    index = {tuple(r[k] for k in ("setting", "batch", "precision", "mp", "conditioning")): r for r in rows if r.get("gains", "per_head") == "per_head"}
    out = [
        "| setting | batch | precision | adaln A img/s | % of peak | rotation+scale / adaln, A · E (FLOP bound) | E / A, adaln · rotation+scale | bf16 speed-up, adaln A |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting, batch, precision in dict.fromkeys((r["setting"], r["batch"], r["precision"]) for r in rows):
        get = lambda mp, c: index.get((setting, batch, precision, mp, c))  # noqa: E731
        a, e, ra, re_ = get("A", "adaln"), get("E", "adaln"), get("A", "rotation+scale"), get("E", "rotation+scale")
        if not (a and e and ra and re_):
            continue
        t = lambda x, y: x["train_step_s"] / y["train_step_s"]  # noqa: E731
        fp32 = index.get((setting, batch, "fp32", "A", "adaln"))
        speedup = f"{t(fp32, a):.2f}" if precision != "fp32" and fp32 else ""
        out.append(
            f"| {setting} | {batch} | {precision} | {a['train_images_per_s']:.0f} | {100 * a['fraction_of_peak']:.0f} | "
            f"{t(ra, a):.3f} · {t(re_, e):.3f} ({ra['train_gflops_per_step'] / a['train_gflops_per_step']:.3f}) | "
            f"{t(e, a):.2f} · {t(re_, ra):.2f} | {speedup} |"
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per group (the fastest counts)")
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=list(SETTINGS))
    p.add_argument("--strategies", nargs="+", default=list(NAMED_STRATEGIES), choices=list(NAMED_STRATEGIES))
    p.add_argument("--precisions", nargs="+", default=None, choices=list(PRECISIONS), help="default: both where bf16 is native, else fp32")
    p.add_argument("--fid-n", type=int, default=500, help="real images per set for the FID change (0 = skip FID)")
    p.add_argument("--cell", default="adaln-A-s0", help="the cpu-profile cell to time ('' = skip)")
    p.add_argument("--profile", default="cpu", help="the ablation profile of --cell")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before any work: an unwritable folder fails now, not after the run

    load = os.getloadavg()[0]
    allocation = {"system_malloc_ms": allocation_ms()}
    allocation["kept_memory"] = keep_freed_memory()  # as the CLI and the sweep do
    allocation["kept_memory_ms"] = allocation_ms()
    peaks = precision_peaks()
    precisions = args.precisions or default_precisions()
    rows = bench_models(args.settings, args.strategies, precisions, args.rounds, peaks)
    header = run_header("run.py", argv)
    report = {
        "date_utc": header["date_utc"],
        "command": header["command"],
        "machine": {"threads": torch.get_num_threads(), "arch": platform.machine(), "torch": torch.__version__, **{k: header[k] for k in ("cpu_capability", "native_bf16")}},
        "precisions": precisions,
        "load_average": round(load, 2),
        "matmul_peak_gflops_per_s": peaks,
        "fresh_42mb_tensor": allocation,
        "targets": ratios(rows, peaks),
        "rows": rows,
    }
    if args.fid_n:
        report["fid"] = bench_fid(args.fid_n, speed_images=64, rounds=3)
        report["targets"] += fid_ratios(report["fid"])
    if args.cell:
        report["cell"] = bench_cell(args.profile, args.cell)
    return write_report(out / "latest", report, markdown(report))


def run_header(script: str, argv: list[str] | None) -> dict:
    """When, by which command and on what a bench ran: the first keys of every bench's report."""
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join(["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])]),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
    }


def default_precisions() -> list[str]:
    """Every precision where bf16 is native; fp32 alone where the CPU emulates bf16 (a bf16 group would take
    hours there and measure the emulation, not this suite)."""
    return list(PRECISIONS) if native_bf16() else ["fp32"]


def precision_peaks() -> dict[str, float]:
    """The matmul peak per precision; an emulated bf16 on a smaller product (it runs ~100× slower)."""
    return {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16, *((2048, 10) if native_bf16() else (512, 3)))}


def profile_precision() -> str:
    """The cpu profile's training precision on this machine (its `auto` resolved), in the benches' names."""
    sys.path.insert(0, str(ROOT))  # the profiles live in the repository's ablations/
    from ablations.cells import load_profile

    return {"32-true": "fp32", "bf16-mixed": "bf16-mixed"}[str(load_profile("cpu")["fit"]["trainer"]["precision"])]


def bf16_note(header: dict, precisions: list[str], peaks: dict[str, float]) -> list[str]:
    """The line a report gives when bf16 was not timed: what bounds the bf16 target on this machine."""
    if "bf16-mixed" in precisions:
        return []
    return [
        f"bf16-mixed not timed: this CPU ({header['cpu_capability']}) has no native bf16, so oneDNN emulates it; its bf16 matmul "
        f"ran at {peaks['bf16']:.1f} GFLOP/s against {peaks['fp32']:.0f} in fp32 in this run, which bounds the bf16 target here.",
        "",
    ]


def write_report(stem: Path, report: dict, text: str) -> dict:
    """A bench's report as JSON and Markdown beside each other (stem.json, stem.md)."""
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(stem.with_suffix(".md"))
    return report


if __name__ == "__main__":
    main()
