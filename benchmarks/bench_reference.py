"""This suite's training step against facebookresearch/DiT's, timed in the same interleaved rounds: the paper's
S/4 on 16×16×4 latents (128-px ImageNet), batch 32, each system with its own loss and optimizer.

    git clone https://github.com/facebookresearch/DiT /tmp/DiT     # outside this repository: nothing of it is copied
    python benchmarks/bench_reference.py --dit /tmp/DiT [--rounds 10] [--out results/bench]

Writes results/bench/reference.json and reference.md. DiT's side is its own `models.py` (DiT-S/4, learned sigma)
and its own `diffusion` package (`create_diffusion(timestep_respacing="")`, L_simple + L_vlb) with its train.py's
AdamW (lr 1e-4, no weight decay), in fp32 and eager as train.py runs it, and, where the CPU has bf16 natively,
also in bf16 autocast (forward and loss; backward and AdamW as autocast leaves them), the fair match for this
suite's bf16-mixed step: the target compares the two at the same precision. Neither side updates an EMA in the timed
step (DiT's train.py does one per step, the suite's Lightning callback too): the step is forward, loss, backward,
optimizer. This suite's side is the cpu profile's: the `paper` preset (Adam, gradient clipping), in fp32 eager
and with the profile's precision (bf16-mixed where the CPU has native bf16, else fp32) and compiled training pass.

DiT's models.py imports PatchEmbed, Attention and Mlp from timm, and timm needs torchvision, which does not import
beside the CPU torch this suite pins. `timm_layers` registers stand-ins under timm's module name that compute what
timm 1.0's layers compute for DiT's arguments (a strided convolution and flatten; qkv projection, fused
scaled-dot-product attention, output projection; two linears around the activation), with timm's attribute names,
so DiT's own initialisation and forward run unchanged.

Both steps are mostly matrix products, so the machine's matmul peak, measured in the same run, bounds them: the
report gives each step's FLOPs (torch's counter, forward and backward) and fraction of that peak, and the best
ratio to DiT this suite could reach at its precision if its step ran at the peak. Where that bound is under the
target, no code change can meet it on this machine at that precision: only fewer FLOPs or a faster unit (bf16
where it is native) can.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lit_mpdit.cost import n_params

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PRECISIONS, Config, precision_peaks, profile_precision, run_header, timed, train_gflops, write_report  # noqa: E402

BATCH, INPUT, CHANNELS, CLASSES = 32, 16, 4, 1000
TARGET = 1.3  # the speed issue: this suite's step at the cpu profile's setting ≥ 1.3× DiT's


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, **_):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features), act_layer(), nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def timm_layers() -> None:
    """Make `from timm.models.vision_transformer import PatchEmbed, Attention, Mlp` find the stand-ins."""
    vit = types.ModuleType("timm.models.vision_transformer")
    vit.PatchEmbed, vit.Attention, vit.Mlp = PatchEmbed, Attention, Mlp
    models = types.ModuleType("timm.models")
    models.vision_transformer = vit
    timm = types.ModuleType("timm")
    timm.models = models
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.vision_transformer": vit})


class Reference:
    """DiT-S/4 with its own diffusion loss and optimizer; `step()` is one training step of its train.py, EMA aside."""

    def __init__(self, dit: Path):
        timm_layers()
        sys.path.insert(0, str(dit))
        import models
        from diffusion import create_diffusion

        torch.manual_seed(0)
        self.model = models.DiT_models["DiT-S/4"](input_size=INPUT, num_classes=CLASSES)
        self.diffusion = create_diffusion(timestep_respacing="")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0)
        self.x, self.y = torch.randn(BATCH, CHANNELS, INPUT, INPUT), torch.randint(0, CLASSES, (BATCH,))
        self.params = n_params(self.model)

    def loss(self) -> torch.Tensor:
        t = torch.randint(0, self.diffusion.num_timesteps, (BATCH,))
        return self.diffusion.training_losses(self.model, self.x, t, dict(y=self.y))["loss"].mean()

    def step(self, dtype: torch.dtype | None = None) -> None:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = self.loss()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dit", required=True, help="a checkout of facebookresearch/DiT (its models.py and diffusion/)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (the fastest counts)")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)
    dit, out = Path(args.dit), Path(args.out)
    if not (dit / "models.py").is_file() or not (dit / "diffusion" / "__init__.py").is_file():
        p.error(f"--dit: {dit} has no models.py and diffusion/ of facebookresearch/DiT; clone https://github.com/facebookresearch/DiT there")
    out.mkdir(parents=True, exist_ok=True)
    reference = Reference(dit)
    precision = profile_precision()  # bf16-mixed where the CPU has it natively, else fp32
    keys = [(mp, p, compiled) for mp in ("A", "E") for p, compiled in (("fp32", False), (precision, True))]  # (rung, precision, compiled)
    ours = {key: Config("S/4 latents", "adaln", key[0], BATCH, key[1], compiled=key[2], optimizer="paper") for key in keys}
    dit_precisions = dict.fromkeys(["fp32", precision])  # DiT at each precision this suite's side runs at
    systems = {**{("DiT", p): (lambda p=p: reference.step(PRECISIONS[p])) for p in dit_precisions}, **{key: c.step for key, c in ours.items()}}
    for step in systems.values():
        step()  # compiles, or warms the allocator and oneDNN
    best = {name: float("inf") for name in systems}
    for _ in range(args.rounds):
        for name, step in systems.items():
            best[name] = min(best[name], timed(step))
    peaks = precision_peaks()  # in this run, after the timed rounds
    peak_of = lambda p: peaks["bf16" if PRECISIONS[p] else "fp32"]  # noqa: E731 - GFLOP/s of the unit a precision runs on
    gflops = {mp: ours[mp, "fp32", False].train_gflops() for mp in ("A", "E")}  # counted eagerly: compiling changes no FLOP
    dit_gflops = train_gflops(reference.loss, reference.optimizer)
    rows = [{"system": "facebookresearch/DiT", "rung": "", "precision": p, "compiled": False, "params": reference.params, "step_s": best["DiT", p],
             "train_gflops": dit_gflops} for p in dit_precisions]
    rows += [
        {"system": "lit_mpdit", "rung": mp, "precision": precision, "compiled": compiled, "params": n_params(ours[mp, precision, compiled].module.net),
         "step_s": best[mp, precision, compiled], "train_gflops": gflops[mp]}
        for mp, precision, compiled in keys
    ]  # fmt: skip
    for row in rows:  # against DiT at the row's precision
        dit_s = best["DiT", row["precision"]]
        row["speed_vs_dit"] = dit_s / row["step_s"]
        row["fraction_of_peak"] = row["train_gflops"] / row["step_s"] / peak_of(row["precision"])
        # Had the step run at the matmul peak: the most a faster implementation could give at this precision.
        row["bound_vs_dit"] = dit_s / (row["train_gflops"] / peak_of(row["precision"]))
    profile = next(r for r in rows if r["rung"] == "A" and r["compiled"])
    report = {
        **run_header("bench_reference.py", argv),
        "rounds": args.rounds,
        "profile_precision": precision,
        "peaks_gflops": peaks,
        "target": {"value": profile["speed_vs_dit"], "goal": f"≥ {TARGET}", "met": profile["speed_vs_dit"] >= TARGET,
                   "bound": profile["bound_vs_dit"], "reachable": profile["bound_vs_dit"] >= TARGET},
        "rows": rows,
    }  # fmt: skip
    return write_report(out / "reference", report, markdown(report))


def markdown(report: dict) -> str:
    t = report["target"]
    return "\n".join([
        f"# This suite's training step against facebookresearch/DiT's, {report['date_utc']}",
        "",
        f"`{report['command']}` on {report['threads']} threads, torch {report['torch']}; S/4 on {INPUT}×{INPUT}×{CHANNELS} latents, "
        f"batch {BATCH}, {CLASSES} classes; fastest of {report['rounds']} interleaved rounds; forward, loss, backward and optimizer, no EMA.",
        "",
        f"Rung A at the cpu profile's setting ({report['profile_precision']}, compiled) against DiT at the same precision: **{t['value']:.2f}×** (goal {t['goal']}: {'met' if t['met'] else 'not met'}).",
        "",
        f"What bounds it: matmul peak in this run {report['peaks_gflops']['fp32']:.0f} GFLOP/s fp32, {report['peaks_gflops']['bf16']:.1f} bf16. "
        f"At the profile's precision this suite's step would be {t['bound']:.2f}× DiT's if it ran at that peak"
        + ("." if t["reachable"] else f", under the goal: on this machine at {report['profile_precision']} the target cannot be met by a faster implementation of the same FLOPs."),
        "",
        "| system | rung | precision | compiled | params | step ms | GFLOP per step | fraction of matmul peak | speed vs DiT (same precision) | at the peak, vs DiT |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['system']} | {r['rung']} | {r['precision']} | {'yes' if r['compiled'] else 'no'} | {r['params'] / 1e6:.2f} M | {1e3 * r['step_s']:.0f} | "
          f"{r['train_gflops']:.1f} | {r['fraction_of_peak']:.2f} | {r['speed_vs_dit']:.2f} | {r['bound_vs_dit']:.2f} |" for r in report["rows"]),
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    main()
