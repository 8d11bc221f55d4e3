"""Conditioning strategies: how the condition c modulates the tokens h entering a sub-block.

Every operation reads its own slice of a zero-initialised head φ(c), so each is the identity at
initialisation. Strategies are `+`-compositions of operations, applied in the fixed order
scale → shift → rotation; `adaln` is an alias for `scale+shift`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lit_mpdit.errors import ConfigError

# ----------------------------------------------------------------------------
# The operations, each a pure function of the tokens (N, T, D) and its parameters (N, 1, width).


def scale(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """h ⊙ (1 + s)."""
    return h * (1 + s)


def shift(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h + b."""
    return h + b


def rotate(h: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate channel pair (i, i + D/2) by θ_i: a 2-D rotation per pair, so every token keeps its norm."""
    h1, h2 = h.chunk(2, dim=-1)  # (N, T, D/2) each
    cos, sin = torch.cos(theta), torch.sin(theta)  # (N, 1, D/2)
    return torch.cat([h1 * cos - h2 * sin, h1 * sin + h2 * cos], dim=-1)  # (N, T, D)


@dataclass(frozen=True)
class Operation:
    name: str
    width_ratio: float  # head outputs per channel: 1 for scale and shift, 1/2 for a rotation
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def width(self, dim: int) -> int:
        return int(dim * self.width_ratio)


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("scale", 1.0, scale),
        Operation("shift", 1.0, shift),
        Operation("rotation", 0.5, rotate),
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
        for op, p in zip(self.operations, chunks):
            h = op.apply(h, p)
        return h
