"""Parameter counts of the paper's own models, for tests/test_paper_variants.py.

Run outside this repository against a checkout of the paper's code (ericbill21/map-dit) at one branch:

    git -C map-dit archive <branch> src | tar -x -C /tmp/mapdit-<branch>
    python tools/mapdit_counts.py /tmp/mapdit-<branch> <branch>      # needs einops

It instantiates that branch's DiT-S/4 on 16×16×4 latents with 1000 classes, as its train.py would, and prints
the parameter count of every model the branch builds. Nothing of that code is kept here.
"""
from __future__ import annotations

import sys

OLD_MOD_OPTS = {  # the five strategies as the branch's flags
    "adaln": dict(scale_mod=True, shift_mod=True),
    "shift": dict(scale_mod=False, shift_mod=True),
    "scale": dict(scale_mod=True, shift_mod=False),
    "rotation": dict(scale_mod=False, shift_mod=False, rotation_mod=True),
    "rotation+scale": dict(scale_mod=True, shift_mod=False, rotation_mod=True),
}
MORPH_FLAGS = ("use_cosine_attention", "use_weight_normalization", "use_forced_weight_normalization", "use_mp_residual",
               "use_mp_silu", "use_mp_embedding", "use_no_layernorm", "use_mp_pos_enc")


def main(checkout: str, branch: str) -> None:
    sys.path.insert(0, checkout)
    from src.models import DIT_MODELS  # the paper's code, imported from the given checkout

    build = lambda **kw: DIT_MODELS["DiT-S/4"](input_size=16, in_channels=4, num_classes=1000, **kw)  # noqa: E731
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    if branch == "old-mod_opts":
        models = {f"old-mod_opts/{name}": build(gate_mod=True, **flags) for name, flags in OLD_MOD_OPTS.items()}
    elif branch == "final":
        models = {"final": build()}
    elif branch == "morph":
        models = {f"morph/{rung}": build(**{flag: on for flag in MORPH_FLAGS}) for rung, on in (("A", False), ("E", True))}
    else:
        raise SystemExit(f"branch: one of old-mod_opts, final, morph, got {branch!r}")
    for name, model in models.items():
        print(f"{name}: {count(model):,}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
