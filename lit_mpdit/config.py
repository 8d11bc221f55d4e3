"""The two tables a reader looks for first: model sizes and the magnitude-preserving ladder A–E."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lit_mpdit.errors import ConfigError, check_choice

# ----------------------------------------------------------------------------
# Sizes: (depth, width, heads). Standard DiT sizes plus two small ones for CPUs.

SIZES: dict[str, tuple[int, int, int]] = {
    "T": (4, 128, 4),  # tiny: tests, the cpu ablation profile and configs/fmnist.yaml
    "C": (6, 192, 6),  # CPU: the first default of configs/fmnist.yaml
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
GATES = ("scalar", "one_plus", "rotation")
TIME_EMBEDDINGS = ("sinusoidal", "fourier", "fourier_step", "table")
ATTENTION_OUTPUT_NORMS = ("none", "heads", "tokens")
GAINS = ("per_head", "per_block", "shared")
ANGLE_HEADS = ("mp", "plain")
OUTPUT_GAINS = ("learned", "fixed")
MLP_ACTIVATIONS = ("gelu", "silu")
CHOICES = {
    "norm": NORMS,
    "gate": GATES,
    "time_embedding": TIME_EMBEDDINGS,
    "attention_output_norm": ATTENTION_OUTPUT_NORMS,
    "gains": GAINS,
    "angle_heads": ANGLE_HEADS,
    "output_gain": OUTPUT_GAINS,
    "mlp_activation": MLP_ACTIVATIONS,
}


@dataclass(frozen=True)
class MPFlags:
    """Every design choice the ladder and the paper's variants vary, each readable on its own."""

    weight_norm: bool = False  # MP linear layers: no bias, unit-RMS weight rows, learned gains
    forced_weight_norm: bool = False  # rewrite stored weights to unit RMS while training
    cosine_attention: bool = False  # unit-RMS queries and keys per head
    attention_output_norm: str = "none"  # none; heads = each head's output to unit RMS; tokens = the projected output
    mp_silu: bool = False  # SiLU/0.596 instead of GELU(tanh) and SiLU
    mp_residual: bool = False  # mp_sum(x, gate(y), 0.3) instead of x + gate(y)
    mp_embedding: bool = False  # unit-RMS class rows, mp_sum merge of time and class
    mp_pos_enc: bool = False  # unit-RMS positional table merged with mp_sum
    norm: str = "layernorm"  # normalization before each sub-block and the final layer
    bias: bool = True  # standard linear layers carry a bias; without one the patches get a constant-1 channel
    gate: str = "scalar"  # scalar g·y (AdaLN-Zero: closed at init); one_plus (1 + g)·y (open); rotation of y by θ(c)
    time_embedding: str = "sinusoidal"  # DiT's sinusoids of t; fourier = MP Fourier of ln(σ_t)/4; fourier_step = of t; table
    time_channels: int = 256  # features fed to the time MLP; 0 = the model width
    fourier_sqrt2: bool = True  # EDM2's √2 on the Fourier features (unit RMS); off: plain cosines, RMS 0.71 (map-dit's old-mod_opts)
    gains: str = "per_head"  # learned gains of the MP modulation heads: one per head, per block, or one for all
    angle_heads: str = "mp"  # rotation angles from MP rows with a learned gain, or from a plain zero-initialised linear
    output_gain: str = "learned"  # the MP output projection's gain: learned from 0, or fixed at 1 (it starts non-zero)
    mlp_activation: str = "gelu"  # DiT's GELU(tanh) in the MLP, or SiLU (mp_silu overrides both)

    def __post_init__(self):
        for name, allowed in CHOICES.items():  # set by --model.norm, or by --model.flags for the rest
            check_choice("model.norm" if name == "norm" else f"model.flags.{name}", getattr(self, name), allowed)
        if self.time_channels < 0:
            raise ConfigError(f"model.flags.time_channels: must be a positive integer or 0 (the width), got {self.time_channels}")

    @property
    def family(self) -> str:
        """'mp' models train with EDM2's optimizer preset, 'standard' ones with DiT's."""
        return "mp" if self.weight_norm else "standard"


_B = MPFlags(weight_norm=True, forced_weight_norm=True, bias=False)
_C = dataclasses.replace(_B, cosine_attention=True, attention_output_norm="heads")
_D = dataclasses.replace(
    _C, mp_silu=True, mp_residual=True, mp_embedding=True, mp_pos_enc=True, gate="one_plus", time_embedding="fourier"
)
LADDER: dict[str, MPFlags] = {
    "A": MPFlags(),  # the standard DiT
    "B": _B,  # + MP linear layers (weight normalization, forced weight normalization)
    "C": _C,  # + cosine attention, each head's output back to unit RMS
    "D": _D,  # + MP SiLU, MP residuals with open (1 + g) gates, MP embeddings and Fourier time features
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


# ----------------------------------------------------------------------------
# The paper's code (ericbill21/map-dit), one model per branch, rebuilt from the options above: each entry is
# build_dit keyword arguments, exact to the parameter (tests/test_paper_variants.py). Buffers the paper's
# code fills differently and that hold no parameter are noted where they differ.

_OLD_MOD_OPTS = dict(mp="E", attention_output_norm="none", time_embedding="fourier_step", fourier_sqrt2=False)
PAPER_VARIANTS: dict[str, dict[str, object]] = {
    # branch old-mod_opts, src/blocks/dit_block.py: the five strategies as flags on the full MP DiT, every head
    # its own zero-initialised gain, cosine attention without output normalization, Fourier time features of the
    # raw step without EDM2's √2 (RMS 0.71). (Its positional table is centred and normalized per token.)
    **{f"old-mod_opts/{name}": dict(conditioning=name, **_OLD_MOD_OPTS) for name in ("adaln", "shift", "scale", "rotation", "rotation+scale")},
    # branch final, src/blocks/dit_block.py and src/layers/rotation_modulation.py: rotation in place of scale from
    # a plain zero-initialised θ head, the MP shift blend mp_sum(h, b, t), the rotation as the gate, attention
    # normalized per token after its projection, MP Fourier features of the raw step, a fixed output gain.
    "final": dict(
        conditioning="rotation+mpshift",
        mp="E",
        cosine_attention=False,
        attention_output_norm="tokens",
        gate="rotation",
        angle_heads="plain",
        time_embedding="fourier_step",
        output_gain="fixed",
    ),
    # branch morph, src/dit.py with every use_* flag off: the standard DiT as that branch builds it, without any
    # bias (a constant-1 patch channel), SiLU in the MLP, sinusoids of the model's width.
    "morph/A": dict(conditioning="adaln", mp="A", bias=False, mlp_activation="silu", time_channels=0),
    # branch morph with every use_* flag on: one gain per block's AdaLN head, closed gates g·y inside mp_sum,
    # a learned unit-RMS table row per step, cosine attention without output normalization. (Its positional
    # table is normalized per token, not centred.)
    "morph/E": dict(
        conditioning="adaln",
        mp="E",
        attention_output_norm="none",
        gate="scalar",
        gains="per_block",
        time_embedding="table",
        time_channels=0,
    ),
}


def paper_variant(name: str) -> dict[str, object]:
    """The build_dit keyword arguments of a paper variant, by name."""
    check_choice("model.variant", name, PAPER_VARIANTS)
    return dict(PAPER_VARIANTS[name])


def _grid_value(name: str, variant: dict[str, object]) -> str:
    """A variant's value on a grid's rung axis: its branch where the name ends with its strategy, else the name."""
    branch, _, strategy = name.rpartition("/")
    return branch if strategy == variant["conditioning"] else name


GRID_MP_VALUES: tuple[str, ...] = (*LADDER, *dict.fromkeys(_grid_value(n, v) for n, v in PAPER_VARIANTS.items()))


def model_design(
    variant: str | None, conditioning: str | None, mp: str | None, norm: str | None, flags: dict | None
) -> dict[str, object]:
    """build_dit's design arguments from a paper variant and explicit options; an explicit option that
    contradicts the variant is refused, not dropped."""
    named = {k: v for k, v in dict(conditioning=conditioning, mp=mp, norm=norm).items() if v is not None}
    explicit = {k: v for k, v in dict(flags or {}, **named).items() if v is not None}
    design = {"conditioning": "adaln", "mp": "A"} if variant is None else paper_variant(variant)
    for key, value in explicit.items():
        if variant is not None and key in design and design[key] != value:
            option = key if key in ("conditioning", "mp", "norm") else f"flags.{key}"
            raise ConfigError(
                f"model.{option}: {value!r} contradicts model.variant {variant!r}, which sets {design[key]!r}; drop one of them"
            )
    design |= explicit
    conditioning, mp = design.pop("conditioning"), design.pop("mp")
    return {"conditioning": conditioning, "mp": resolve_mp(mp, **design)}


def split_overrides(mp: str) -> tuple[str, dict[str, object]]:
    """A grid rung with single design flags changed: 'E~norm=rmsnorm~mp_residual=false' → ('E', {'norm': 'rmsnorm',
    'mp_residual': False}). Values read as YAML scalars (true/false, integers, names)."""
    base, *parts = mp.split("~")
    fields = {f.name: f for f in dataclasses.fields(MPFlags)}
    flags: dict[str, object] = {}
    for part in parts:
        name, eq, text = part.partition("=")
        if name not in fields or not eq:
            raise ConfigError(f"grid mp: {part!r} in {mp!r} is not <flag>=<value>; flags: {', '.join(fields)}")
        value = {"true": True, "false": False}.get(text, int(text) if text.isdigit() else text)
        if isinstance(fields[name].default, bool) != isinstance(value, bool):
            raise ConfigError(f"grid mp: {name} in {mp!r} takes {type(fields[name].default).__name__}, got {text!r}")
        flags[name] = value
    return base, flags


def grid_design(conditioning: str, mp: str) -> dict[str, object]:
    """The model of a grid cell: a rung of the ladder with a strategy, or the paper's branch that builds that
    strategy (mp `old-mod_opts` with any of its five, `final` with rotation+mpshift, `morph/A`, `morph/E`), either
    with single flags changed after a '~' (`E~gate=scalar`: rung E with closed gates)."""
    base, flags = split_overrides(mp)
    check_choice("grid mp", base, GRID_MP_VALUES)
    if base in LADDER:
        design: dict[str, object] = {"conditioning": conditioning, "mp": base}
    else:
        name = next(n for n in (f"{base}/{conditioning}", base) if n in PAPER_VARIANTS)
        if PAPER_VARIANTS[name]["conditioning"] != conditioning:
            builds = sorted(str(v["conditioning"]) for n, v in PAPER_VARIANTS.items() if _grid_value(n, v) == base)
            raise ConfigError(f"grid conditioning: {base} does not build {conditioning!r}; allowed: {', '.join(builds)}")
        design = {"variant": name}
    if flags:
        design["flags"] = flags
    return design


def grid_flags(conditioning: str, mp: str) -> MPFlags:
    """The design flags of a grid cell's model (its family chooses the optimizer preset); a bad override is refused."""
    design = grid_design(conditioning, mp)
    return model_design(design.get("variant"), design.get("conditioning"), design.get("mp"), None, design.get("flags"))["mp"]
