"""FID of the paper's own models at the cpu profile's budget: does map-dit's code also make the magnitude-preserving
DiT worse than the standard one here (issue 26, item 2)?

Run outside this repository's model code against a checkout of the paper's code (ericbill21/map-dit) at `morph`:

    git -C map-dit archive morph | tar -x -C /tmp/mapdit-morph
    PYTHONPATH=<einops> python tools/mapdit_oracle.py /tmp/mapdit-morph --commit <sha> --out results/ablations/oracle

It trains that branch's DiT with every use_* flag off (rung A) and on (rung E) with its own loss
(`diffusion.training_losses`), samples with its own `p_sample_loop` through `forward_with_cfg`, and scores the
samples with this suite's `fid` command. Everything around the model is the cpu profile's (ablations/profiles.yaml,
read here, not retyped): size, data and its order, batch, steps, the `paper` optimizer preset with the profile's
learning rate per family, the EMA, the precisions and the evaluation protocol. It writes per rung
`<out>/<rung>/{train.json, samples.npz, grid.png, fid.json}`, and `<out>/oracle.md` over every rung in `<out>`.
Nothing of map-dit's code is kept here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.overrides import TorchFunctionMode

from mapdit_counts import MORPH_FLAGS  # the flags that build the branch's models

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ablations/ is a folder of this checkout, not an installed package

from ablations.cells import load_profile  # noqa: E402
from lit_mpdit.config import model_design, parse_size  # noqa: E402
from lit_mpdit.data import instantiate_datamodule, reference_name  # noqa: E402
from lit_mpdit.evaluate import balanced_labels  # noqa: E402
from lit_mpdit.images import save_grid  # noqa: E402
from lit_mpdit.module import OPTIMIZER_PRESETS, lr_factor  # noqa: E402

PROFILE = "cpu"
RUNGS = {"A": False, "E": True}  # every use_* flag of the branch off, or on
LOG_EVERY, PRINT_EVERY = 50, 100  # steps per point of the loss curve, per progress line
SAMPLE_BATCH = 256  # labels per sampling batch, as DiffusionModule.sample
GRID_PER_CLASS = 10


class PromoteLerp(TorchFunctionMode):
    """autocast's `promote` policy (as for cat and stack: inputs cast to the widest dtype) for lerp, which autocast
    leaves alone: the branch's mp_sum lerps a bf16 linear output towards an fp32 tensor (the positional buffer,
    an embedding), which torch refuses. Applied from outside, so the branch's code runs as written."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.lerp, torch.Tensor.lerp):
            start, end, *rest = args
            dtype = torch.promote_types(start.dtype, end.dtype)
            args = (start.to(dtype), end.to(dtype), *rest)
        return func(*args, **(kwargs or {}))


def autocast(bf16: bool) -> contextlib.ExitStack:
    """bf16 autocast (with `PromoteLerp`) where the profile trains or samples in bf16, else nothing (fp32)."""
    stack = contextlib.ExitStack()
    if bf16:
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        stack.enter_context(PromoteLerp())
    return stack


def family(rung: str) -> str:
    """'standard' or 'mp', as this suite's mirror of the branch's model (config.PAPER_VARIANTS) classifies it:
    it chooses the profile's learning rate."""
    return model_design(f"morph/{rung}", None, None, None, None)["mp"].family


def build(dit_class: type, rung: str, data, profile: dict, seed: int) -> torch.nn.Module:
    depth, width, heads, patch = parse_size(profile["fit"]["model"]["size"])
    torch.manual_seed(seed)  # the initialisation, as map-dit's train.py seeds it before building
    flags = {flag: RUNGS[rung] for flag in MORPH_FLAGS}
    return dit_class(
        depth=depth, hidden_size=width, patch_size=patch, num_heads=heads,
        input_size=data.image_size, in_channels=data.in_channels, num_classes=data.num_classes,
        **flags,
    )  # class dropout 0.1 and learned variance: the branch's defaults, and this suite's


def train(model, diffusion, data, profile: dict, lr: float, steps: int, bf16: bool) -> tuple[AveragedModel, dict]:
    """The suite's training loop around the branch's model and loss: Lightning's order (backward, clip, step,
    schedule, EMA), the `paper` preset's schedule over `steps`, the EMA started at the profile's step scaled
    to `steps`."""
    preset = OPTIMIZER_PRESETS[profile["fit"]["model"]["optimizer"]]
    warmup, decay = preset.steps(steps)
    ema_start = profile["ema_start"] * steps // profile["fit"]["trainer"]["max_steps"]
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=preset.betas, weight_decay=preset.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, decay))
    # As Lightning's EMAWeightAveraging(decay, update_starting_at_step): its first update copies the weights.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(profile["ema_decay"]), use_buffers=True)
    loader = data.train_dataloader()  # the suite's images, scaling to [-1, 1] and order (EpochShuffle)
    model.train()  # the branch drops labels for guidance in training mode only
    curve, window, step, epoch = [], [], 0, 0
    started = time.perf_counter()
    while step < steps:
        loader.sampler.set_epoch(epoch)  # as Lightning does before every epoch
        for x, y in loader:
            t = torch.randint(0, diffusion.num_timesteps, (len(x),))
            with autocast(bf16):
                loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite training loss at step {step}: lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if preset.clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), preset.clip)
            opt.step()
            sched.step()
            if step >= ema_start:  # `step` is the zero-based index of the step just taken, Lightning's step_idx
                ema.update_parameters(model)
            step += 1
            window.append(loss.item())
            if step % LOG_EVERY == 0 or step == steps:
                curve.append({"step": step, "loss": sum(window) / len(window)})
                window = []
            if step % PRINT_EVERY == 0:
                per_step = (time.perf_counter() - started) / step
                print(f"[oracle] step {step}/{steps}: loss {curve[-1]['loss']:.4f}, {per_step:.3f} s/step", flush=True)
            if step == steps:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    schedule = {"warmup_steps": warmup, "decay_start": decay, "clip": preset.clip, "betas": list(preset.betas), "ema_start": ema_start}
    return ema, {"loss_curve": curve, "train_s": seconds, "s_per_step": seconds / steps, **schedule}


@torch.no_grad()
def validation_loss(net, diffusion, data, batches: int, bf16: bool) -> float:
    """The EMA weights' loss on the suite's validation batches with its fixed steps and noise per batch
    (DiffusionModule.evaluation_losses): the cells' final val/loss, for the same weights."""
    net.eval()
    losses = []
    for i, (x, y) in zip(range(batches), data.val_dataloader()):
        gen = torch.Generator().manual_seed(i)
        t = torch.randint(0, diffusion.num_timesteps, (len(x),), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        with autocast(bf16):
            losses.append(diffusion.training_losses(net, x, t, dict(y=y), noise=noise)["loss"].mean().item())
    return sum(losses) / len(losses)


@torch.no_grad()
def sample(net, diffusion, labels: torch.Tensor, shape: tuple[int, ...], guidance: float, null_class: int, seed: int, bf16: bool) -> torch.Tensor:
    """The branch's DDPM sampling with guidance on ε (`forward_with_cfg` reads the conditional half, the other half
    carries the null class), x0 clamped to [-1, 1] as the suite does for pixels."""
    net.eval()
    torch.manual_seed(seed)  # the first noise here, and every step's noise, which p_sample draws from the global stream
    out = []
    for y in labels.split(SAMPLE_BATCH):
        z = torch.randn(len(y), *shape)
        kwargs = dict(y=torch.cat([y, torch.full_like(y, null_class)]), cfg_scale=guidance)
        with autocast(bf16):
            x = diffusion.p_sample_loop(net.forward_with_cfg, (2 * len(y), *shape), torch.cat([z, z]), clip_denoised=True, model_kwargs=kwargs, device="cpu")
        out.append(x[: len(y)])
    return torch.cat(out)


def class_rows(images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    """The first `per_class` images of every class, class by class: one row per class in a grid."""
    return torch.cat([images[labels == c][:per_class] for c in range(num_classes)])


def fid(samples: Path, reference: str, precision: str, bootstrap: int, seed: int) -> dict:
    """This suite's FID protocol, through its command line, as a separate process."""
    command = [sys.executable, "-m", "lit_mpdit", "fid", reference, str(samples), "--precision", precision, "--bootstrap", str(bootstrap), "--seed", str(seed)]
    done = subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)  # its warnings pass through
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "command": shlex.join(["python", *command[1:]])}


def run_rung(rung: str, args, profile: dict, dit_class: type, create_diffusion, data, command: str) -> None:
    out = args.out / rung
    out.mkdir(parents=True, exist_ok=True)
    ev, bf16_train = profile["eval"], profile["fit"]["trainer"]["precision"] == "bf16-mixed"
    lr = profile["lr"][family(rung)]
    model = build(dit_class, rung, data, profile, args.seed)
    print(f"[oracle] {rung}: {sum(p.numel() for p in model.parameters()):,} parameters, lr {lr:g}, {args.steps} steps", flush=True)
    ema, record = train(model, create_diffusion(""), data, profile, lr, args.steps, bf16_train)
    net = ema.module
    val_loss = validation_loss(net, create_diffusion(""), data, profile["fit"]["trainer"]["limit_val_batches"], bf16_train)

    labels = balanced_labels(args.n_fake, data.num_classes)
    started = time.perf_counter()
    shape = (data.in_channels, data.image_size, data.image_size)
    x = sample(net, create_diffusion(str(ev["steps"])), labels, shape, ev["guidance"], data.num_classes, args.seed, ev["sample_precision"] == "bf16")
    sample_s = time.perf_counter() - started
    images = data.to_images(x)  # (N, C, H, W) uint8
    np.savez_compressed(out / "samples.npz", images=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    per_class = min(GRID_PER_CLASS, args.n_fake // data.num_classes)
    save_grid(class_rows(images, labels, data.num_classes, per_class), out / "grid.png", nrow=per_class)

    record = {
        "rung": rung, "flags": {flag: RUNGS[rung] for flag in MORPH_FLAGS}, "family": family(rung), "commit": args.commit,
        "checkout": str(args.checkout), "seed": args.seed, "steps": args.steps, "batch": data.batch_size, "lr": lr,
        "ema_decay": profile["ema_decay"], **record, "ema_val_loss": val_loss,
        "precision": {"train": profile["fit"]["trainer"]["precision"], "sample": ev["sample_precision"], "inception": ev["precision"]},
        "sampling": {"n_fake": args.n_fake, "steps": ev["steps"], "sampler": ev["sampler"], "guidance": ev["guidance"], "weights": ev["weights"], "clip_x0": True},
        "sample_s": sample_s, "command": command,
    }
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"[oracle] {rung}: trained in {record['train_s']:.0f} s, EMA val loss {val_loss:.4f}, sampled in {sample_s:.0f} s", flush=True)
    reference = f"{reference_name(data, ev['reference_split'])}:{args.n_ref}"
    scored = fid(out / "samples.npz", reference, ev["precision"], ev["bootstrap"], args.seed)
    (out / "fid.json").write_text(json.dumps(scored, indent=2) + "\n")
    lo, hi = scored["ci95"]
    print(f"[oracle] {rung}: FID-{args.n_fake} {scored['fid']:.2f} [{lo:.2f}, {hi:.2f}]", flush=True)


def report(out: Path) -> None:
    """oracle.md over every rung with results in `out` (rungs may be run by separate commands)."""
    done = [r for r in RUNGS if (out / r / "fid.json").is_file()]
    runs = {r: (json.loads((out / r / "train.json").read_text()), json.loads((out / r / "fid.json").read_text())) for r in done}
    lines = [
        "# map-dit's own models at the cpu profile's budget",
        "",
        "| rung | FID-N [95% bootstrap] | final EMA loss | train s | sample s |",
        "|---|---|---|---|---|",
    ]
    for rung, (record, scored) in runs.items():
        lo, hi = scored["ci95"]
        fid_text = f"FID-{scored['n_fake']} {scored['fid']:.2f} [{lo:.2f}, {hi:.2f}]"
        lines.append(f"| {rung} | {fid_text} | {record['ema_val_loss']:.4f} | {record['train_s']:.0f} | {record['sample_s']:.0f} |")
    if "A" in runs and "E" in runs:
        (a, a_ci), (e, e_ci) = ((runs[r][1]["fid"], runs[r][1]["ci95"]) for r in ("A", "E"))
        change = (e - a) / a
        overlap = "overlap" if e_ci[0] <= a_ci[1] and a_ci[0] <= e_ci[1] else "do not overlap"
        lines += ["", f"Rung E's FID is {abs(change):.0%} {'higher (worse)' if change > 0 else 'lower (better)'} than rung A's "
                  f"({e:.2f} against {a:.2f}); their 95% intervals {overlap}."]
    lines += ["", "Final EMA loss: the EMA weights' diffusion loss on the validation batches with the suite's fixed noise (its cells' val/loss).", ""]
    for rung, (record, scored) in runs.items():
        lines += [f"{rung}: map-dit `morph` at `{record['commit']}`, lr {record['lr']:g}, {record['steps']} steps of batch "
                  f"{record['batch']}, {record['precision']['train']} training, {record['precision']['sample']} sampling", ""]
    commands = dict.fromkeys([record["command"] for record, _ in runs.values()] + [scored["command"] for _, scored in runs.values()])
    lines += ["Produced by (from the repository's root)", "", *(f"    {c.replace(f'{ROOT}/', '')}" for c in commands), ""]
    (out / "oracle.md").write_text("\n".join(lines))


def main() -> None:
    profile = load_profile(PROFILE)  # resolves its 'auto' precisions for this machine
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", type=Path, help="an export of map-dit at branch morph")
    p.add_argument("--commit", required=True, help="the commit the export was made from (recorded)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rungs", nargs="+", choices=list(RUNGS), default=list(RUNGS))
    p.add_argument("--steps", type=int, default=profile["fit"]["trainer"]["max_steps"])
    p.add_argument("--n-fake", type=int, default=profile["eval"]["n_fake"])
    p.add_argument("--n-ref", type=int, default=profile["eval"]["n_ref"], help="reference images of the FID (smaller for a smoke run)")
    p.add_argument("--seed", type=int, default=profile["seeds"][0], help="initialisation, noise, steps, class dropout, sampling")
    args = p.parse_args()
    if (profile["eval"]["sampler"], profile["eval"]["weights"]) != ("ddpm", "ema"):  # what sample() and train() implement
        raise SystemExit(f"profile {PROFILE}: eval samples with {profile['eval']['sampler']} from {profile['eval']['weights']} weights; this tool does ddpm from the EMA")
    args.out = args.out.resolve()  # the FID runs from the repository root
    command = shlex.join(["python", "tools/mapdit_oracle.py", *sys.argv[1:]])

    sys.path.insert(0, str(args.checkout.resolve()))
    from diffusion import create_diffusion  # the paper's code, imported from the given checkout
    from src.dit import DiT

    spec = profile["fit"]["data"]
    # The profile's data module, its own seed (0) as in every cell: --seed does not reach the data order there either.
    data = instantiate_datamodule(spec["class_path"], spec.get("init_args", {}), "profile fit.data")
    data.prepare_data()
    for rung in args.rungs:
        run_rung(rung, args, profile, DiT, create_diffusion, data, command)
    report(args.out)
    print(f"[oracle] wrote {args.out / 'oracle.md'}", flush=True)


if __name__ == "__main__":
    main()
