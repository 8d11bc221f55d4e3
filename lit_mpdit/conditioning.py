"""Conditioning strategies: how the condition c modulates the tokens h entering a sub-block.

Every operation reads its own slice of a zero-initialised head φ(c), so each is the identity at
initialisation. Strategies are `+`-compositions of operations, applied in the fixed order
scale → shift → rotation; `adaln` is an alias for `scale+shift`.

Each operation acts on channel pairs (i, i + D/2) by a per-sample 2×2 matrix and an offset, so a whole
strategy composes, on the small (N, 1, D) coefficients, into one `PairAffine` that touches the tokens
once: one fused multiply-add for adaln, two for anything with a rotation.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
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


# The operations: parameters (N, 1, width) → their PairAffine.


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


def rotate(h: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """h (N, T, D) rotated pairwise by θ (N, 1, D/2)."""
    return rotation(theta)(h)


@dataclass(frozen=True)
class Operation:
    name: str
    width_ratio: float  # head outputs per channel: 1 for scale and shift, 1/2 for a rotation
    affine: Callable[[torch.Tensor], PairAffine]

    def width(self, dim: int) -> int:
        return int(dim * self.width_ratio)


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("scale", 1.0, scale),
        Operation("shift", 1.0, shift),
        Operation("rotation", 0.5, rotation),
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
                allowed = ", ".join([*NAMED_STRATEGIES, *OPERATIONS]) + " (and any '+' combination)"
                raise ConfigError(f"model.conditioning: unknown strategy {name!r}; allowed: {allowed}")
            names.update(ALIASES.get(part, (part,)))
        return cls(tuple(op for op in OPERATIONS.values() if op.name in names))

    @property
    def name(self) -> str:
        return "+".join(op.name for op in self.operations)

    def widths(self, dim: int) -> list[int]:
        return [op.width(dim) for op in self.operations]

    def width(self, dim: int) -> int:
        """Head outputs this strategy needs for tokens of width `dim` (without a gate)."""
        return sum(self.widths(dim))

    def modulate(self, h: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Apply every operation to h (N, T, D) with its slice of params (N, width(D))."""
        chunks = params.unsqueeze(1).split(self.widths(h.shape[-1]), dim=-1)  # each (N, 1, w)
        return reduce(PairAffine.then, (op.affine(p) for op, p in zip(self.operations, chunks)))(h)
