"""Function-parity fixtures of the paper's own models, for tests/test_mapdit_parity.py.

Run outside this repository's code against a checkout of the paper's code (ericbill21/map-dit) at one branch:

    git -C map-dit archive <branch> | tar -x -C /tmp/mapdit-<branch>
    PYTHONPATH=<einops> python tools/mapdit_fixtures.py /tmp/mapdit-<branch> <branch> <commit>

It builds every model of the branch (the models of tools/mapdit_counts.py) at a tiny size (depth 2, width 32,
2 heads, MLPs of width 32, patch 4, 16×16×3: three channels so that a patch's channel order matters; 10 classes;
a file per branch of at most 0.6 MB), sets every parameter to seeded random values (zero-initialised heads would
hide a transposed or misplaced head), runs one fixed batch of (x, t, y) in evaluation mode in float32, and writes
tests/data/mapdit_<branch>.pt: the branch's commit, the inputs, and per model its state dict (parameters rounded
to float16 and the model run with the rounded values, so the file is half the size and still exact) and output.
Nothing of that code is kept here: only its numbers.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from mapdit_counts import MORPH_FLAGS, OLD_MOD_OPTS  # the flags that build each branch's models

TINY = dict(depth=2, hidden_size=32, patch_size=4, num_heads=2, mlp_ratio=1.0, input_size=16, in_channels=3, num_classes=10)
OUT = Path(__file__).resolve().parent.parent / "tests" / "data"


def branch_models(branch: str) -> dict[str, dict[str, bool]]:
    """The constructor flags of every model the branch builds, by PAPER_VARIANTS name."""
    if branch == "old-mod_opts":
        return {f"old-mod_opts/{name}": dict(gate_mod=True, **flags) for name, flags in OLD_MOD_OPTS.items()}
    if branch == "final":
        return {"final": {}}
    if branch == "morph":
        return {f"morph/{rung}": {flag: on for flag in MORPH_FLAGS} for rung, on in (("A", False), ("E", True))}
    raise SystemExit(f"branch: one of old-mod_opts, final, morph, got {branch!r}")


def inputs() -> dict[str, torch.Tensor]:
    """A batch that touches every path: the first and last step, and the null class (index 10)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=g)
    return {"x": x, "t": torch.tensor([0, 10, 500, 999]), "y": torch.tensor([0, 3, 7, 10])}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter seeded-random and float16-exact: matrices N(0, 1/fan_in) so that the unnormalized models
    stay in range, gains of either sign and a magnitude uniform in [0.5, 1]: the modulations (1 + g·φ) stay in
    range too, where float32's rounding is below the test's 1e-5 (with gains N(0, 1) morph/E's output had RMS 11
    and rounding errors of 1e-4), and no gain is so small that its head or the output would be silent."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        value = torch.randn(p.shape, generator=g)
        if p.ndim == 2:
            value /= p.shape[1] ** 0.5
        else:
            value = value.sign() * (1 + torch.rand(p.shape, generator=g)) / 2
        p.copy_(value.half().float())


def main(checkout: str, branch: str, commit: str) -> None:
    sys.path.insert(0, checkout)
    from src.dit import DiT  # the paper's code, imported from the given checkout

    batch = inputs()
    models = {}
    for i, (name, flags) in enumerate(branch_models(branch).items()):
        torch.manual_seed(i)  # buffers drawn at construction (Fourier features) are the branch's own
        model = DiT(**TINY, **flags).eval()
        randomize(model, seed=i)
        with torch.no_grad():
            out = model(batch["x"], batch["t"], batch["y"])
        state = {k: v.half() if k in dict(model.named_parameters()) else v for k, v in model.state_dict().items()}
        models[name] = {"state_dict": state, "output": out}
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, output RMS {out.square().mean().sqrt():.3f}")
    path = OUT / f"mapdit_{branch}.pt"
    torch.save({"branch": branch, "commit": commit, "size": TINY, **batch, "models": models}, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
