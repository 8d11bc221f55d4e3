"""The two tables a reader looks for first: model sizes and the magnitude-preserving ladder A–E."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lit_mpdit.errors import ConfigError, check_choice

# ----------------------------------------------------------------------------
# Sizes: (depth, width, heads). Standard DiT sizes plus two small ones for CPUs.

SIZES: dict[str, tuple[int, int, int]] = {
    "T": (4, 128, 4),  # tiny: tests and the smoke profile
    "C": (6, 192, 6),  # CPU: the default of configs/fmnist.yaml and the cpu ablation profile
    "XS": (6, 256, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (1, 2, 4, 8)


def parse_size(size: str) -> tuple[int, int, int, int]:
    """'S/4' → (depth, width, heads, patch)."""
    name, _, patch = size.partition("/")
    allowed = [f"{n}/{p}" for n in SIZES for p in PATCH_SIZES]
    if name not in SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        raise ConfigError(f"model.size: unknown size {size!r}; allowed: {', '.join(allowed)}")
    return (*SIZES[name], int(patch))


# ----------------------------------------------------------------------------
# The magnitude-preserving ladder. Each rung adds to the one before (cf. EDM2's Table 1).

NORMS = ("layernorm", "rmsnorm", "none")


@dataclass(frozen=True)
class MPFlags:
    weight_norm: bool = False  # MP linear layers: no bias, unit-RMS weight rows, learned gains
    forced_weight_norm: bool = False  # rewrite stored weights to unit RMS while training
    cosine_attention: bool = False  # unit-RMS queries, keys and attention output per head
    mp_silu: bool = False  # SiLU/0.596 instead of GELU(tanh) and SiLU
    mp_residual: bool = False  # mp_sum(x, (1 + g)·y, 0.3) instead of x + g·y
    mp_embedding: bool = False  # MP Fourier time features, unit-RMS class rows, mp_sum merges
    mp_pos_enc: bool = False  # unit-RMS positional table merged with mp_sum
    norm: str = "layernorm"  # normalization before each sub-block and the final layer

    def __post_init__(self):
        check_choice("model.mp norm", self.norm, NORMS)

    @property
    def family(self) -> str:
        """'mp' models train with EDM2's optimizer preset, 'standard' ones with DiT's."""
        return "mp" if self.weight_norm else "standard"


_B = MPFlags(weight_norm=True, forced_weight_norm=True)
_C = dataclasses.replace(_B, cosine_attention=True)
_D = dataclasses.replace(_C, mp_silu=True, mp_residual=True, mp_embedding=True, mp_pos_enc=True)
LADDER: dict[str, MPFlags] = {
    "A": MPFlags(),  # the standard DiT
    "B": _B,  # + MP linear layers (weight normalization, forced weight normalization)
    "C": _C,  # + cosine attention
    "D": _D,  # + MP SiLU, MP residuals, MP embeddings, MP gates
    "E": dataclasses.replace(_D, norm="none"),  # + no normalization layer: the full MP DiT
}


def resolve_mp(mp: str | MPFlags, **flags) -> MPFlags:
    """A rung name (or flags) plus explicit per-flag overrides, e.g. resolve_mp('E', norm='rmsnorm')."""
    if isinstance(mp, str):
        check_choice("model.mp", mp, LADDER)
        mp = LADDER[mp]
    unknown = set(flags) - {f.name for f in dataclasses.fields(MPFlags)}
    if unknown:
        names = ", ".join(f.name for f in dataclasses.fields(MPFlags))
        raise ConfigError(f"model: unknown magnitude-preserving flag(s) {sorted(unknown)}; allowed: {names}")
    return dataclasses.replace(mp, **{k: v for k, v in flags.items() if v is not None})
