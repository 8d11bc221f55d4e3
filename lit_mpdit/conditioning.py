"""Conditioning strategies: how the condition c modulates the tokens h entering a sub-block.

Every operation reads its own heads φ(c); zero-initialised heads make scale, shift and rotation the
identity at initialisation (the mp shift of the paper's final design starts as a 0.1 blend instead).
Strategies are `+`-compositions of operations, applied in the fixed order
scale → shift → rotation → mpshift; `adaln` is an alias for `scale+shift`.

Each operation acts on channel pairs (i, i + D/2) by a per-sample 2×2 matrix and an offset, so a whole
strategy composes, on the small (N, 1, D) coefficients, into one `PairAffine` that touches the tokens
once: one fused multiply-add for adaln, two for anything with a rotation.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce

import torch

from lit_mpdit.errors import ConfigError

# ----------------------------------------------------------------------------
# Pairwise affine maps of the tokens (N, T, D), with per-sample coefficients (N, 1, D).


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """(x₁ ‖ x₂) → (x₂ ‖ x₁) along the last dimension: each channel meets its pair partner."""
    return x.roll(x.shape[-1] // 2, dims=-1)


@dataclass(frozen=True)
class PairAffine:
    """h ↦ a ⊙ h + b ⊙ swap_halves(h) + c. `b` and `c` are None when zero (no pass over the tokens)."""

    a: torch.Tensor
    b: torch.Tensor | None = None
    c: torch.Tensor | None = None

    def then(self, nxt: PairAffine) -> PairAffine:
        """`nxt` ∘ self, from swap(a ⊙ h) = swap(a) ⊙ swap(h): still of the same form."""
        a = nxt.a * self.a
        b = [nxt.a * self.b] if self.b is not None else []
        c = [nxt.a * self.c] if self.c is not None else []
        if nxt.b is not None:
            b.append(nxt.b * swap_halves(self.a))
            if self.b is not None:
                a = a + nxt.b * swap_halves(self.b)
            if self.c is not None:
                c.append(nxt.b * swap_halves(self.c))
        if nxt.c is not None:
            c.append(nxt.c)
        return PairAffine(a, reduce(operator.add, b) if b else None, reduce(operator.add, c) if c else None)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        out = h * self.a if self.c is None else torch.addcmul(self.c, h, self.a)  # (N, T, D)
        return out if self.b is None else out.addcmul_(swap_halves(h), self.b)


# The operations: their heads' outputs, each (N, 1, width) → their PairAffine.


def logit(p: float) -> float:
    return math.log(p / (1 - p))


MPSHIFT_START = 0.1  # the blend weight t of an mp shift at initialisation (map-dit, branch final)


def scale(s: torch.Tensor) -> PairAffine:
    """h ⊙ (1 + s)."""
    return PairAffine(1 + s)


def shift(b: torch.Tensor) -> PairAffine:
    """h + b."""
    return PairAffine(torch.ones_like(b), c=b)


def rotation(theta: torch.Tensor) -> PairAffine:
    """Rotate channel pair (i, i + D/2) by θ_i: a 2-D rotation per pair, so every token keeps its norm."""
    cos, sin = torch.cos(theta), torch.sin(theta)  # (N, 1, D/2)
    return PairAffine(torch.cat([cos, cos], dim=-1), b=torch.cat([-sin, sin], dim=-1))


def mpshift(b: torch.Tensor, psi: torch.Tensor) -> PairAffine:
    """mp_sum(h, b, t) with a per-sample blend t = sigmoid(ψ + logit(0.1)) (EDM2 Eq. 88 with a learned t).

    A shift that keeps magnitudes: for unit-RMS h and b it returns unit RMS for every t, and it starts at
    t = 0.1, not at the identity (map-dit, branch final).
    """
    t = torch.sigmoid(psi + logit(MPSHIFT_START))  # (N, 1, 1)
    norm = torch.sqrt((1 - t) ** 2 + t**2)
    return PairAffine((1 - t) / norm, c=b * (t / norm))


def rotate(h: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """h (N, T, D) rotated pairwise by θ (N, 1, D/2)."""
    return rotation(theta)(h)


HEAD_KINDS = ("zero", "angle", "fixed", "plain")


@dataclass(frozen=True)
class Head:
    """One head φ(c) = Linear(act(c)) of an operation, and how it starts."""

    kind: str  # zero: starts at 0 (MP rows with a learned gain from 0, or a zero linear); angle: zero or plain,
    #            as the model's angle_heads says; fixed: MP rows of gain 1 (starts non-zero); plain: a zero linear
    per_channel: float = 1.0  # outputs per token channel
    constant: int = 0  # outputs independent of the width

    def width(self, dim: int) -> int:
        return int(dim * self.per_channel) + self.constant


@dataclass(frozen=True)
class Operation:
    name: str
    heads: tuple[Head, ...]
    affine: Callable[..., PairAffine]  # one tensor per head
    identity_at_zero: bool = True  # the identity while its heads output 0

    def widths(self, dim: int) -> list[int]:
        return [head.width(dim) for head in self.heads]

    def width(self, dim: int) -> int:
        return sum(self.widths(dim))


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (  # the order in which a strategy applies its operations
        Operation("scale", (Head("zero"),), scale),
        Operation("shift", (Head("zero"),), shift),
        Operation("rotation", (Head("angle", 0.5),), rotation),
        Operation("mpshift", (Head("fixed"), Head("plain", 0.0, 1)), mpshift, identity_at_zero=False),
    )
}
ALIASES: dict[str, tuple[str, ...]] = {"adaln": ("scale", "shift")}
NAMED_STRATEGIES = ("adaln", "shift", "scale", "rotation", "rotation+scale")


# ----------------------------------------------------------------------------
# A strategy: an ordered set of operations.


@dataclass(frozen=True)
class Conditioning:
    operations: tuple[Operation, ...]

    @classmethod
    def parse(cls, name: str) -> Conditioning:
        """'rotation+scale' → Conditioning((scale, rotation)). Order of the parts does not matter."""
        names: set[str] = set()
        for part in name.split("+"):
            part = part.strip()
            if part not in OPERATIONS and part not in ALIASES:
                allowed = ", ".join(dict.fromkeys([*NAMED_STRATEGIES, *OPERATIONS])) + f" (and any '+' combination of {', '.join(OPERATIONS)})"
                raise ConfigError(f"model.conditioning: unknown strategy {name!r}; allowed: {allowed}")
            names.update(ALIASES.get(part, (part,)))
        return cls(tuple(op for op in OPERATIONS.values() if op.name in names))

    @property
    def name(self) -> str:
        return "+".join(op.name for op in self.operations)

    @property
    def heads(self) -> tuple[Head, ...]:
        """Every head of every operation, in order."""
        return tuple(head for op in self.operations for head in op.heads)

    def widths(self, dim: int) -> list[int]:
        return [head.width(dim) for head in self.heads]

    def width(self, dim: int) -> int:
        """Head outputs this strategy needs for tokens of width `dim` (without a gate)."""
        return sum(self.widths(dim))

    def modulate(self, h: torch.Tensor, params: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Apply every operation to h (N, T, D) with its heads' outputs: one (N, w) tensor per head, or all of
        them side by side as one (N, width(D)) tensor."""
        if isinstance(params, torch.Tensor):
            params = params.split(self.widths(h.shape[-1]), dim=-1)
        parts = iter(p.unsqueeze(1) for p in params)  # each (N, 1, w)
        affines = (op.affine(*(next(parts) for _ in op.heads)) for op in self.operations)
        return reduce(PairAffine.then, affines)(h)
