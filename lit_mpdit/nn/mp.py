"""Magnitude-preserving primitives of EDM2 (Karras et al. 2024, arXiv 2312.02696).

Each primitive keeps unit-variance inputs at unit variance. Equation numbers refer to EDM2.
Functions where there are no weights; modules only where there are.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# Pure functions.


def normalize(w: torch.Tensor, dim: int | tuple[int, ...] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """Scale every slice along `dim` (default: all but the first) to unit RMS, i.e. norm √fan_in (Eq. 47)."""
    if dim is None:
        dim = tuple(range(1, w.ndim))
    rms = w.float().square().mean(dim=dim, keepdim=True).sqrt()
    return w / (rms + eps).to(w.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its output RMS for unit-normal input (Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Interpolate a → b by t and restore unit variance for independent unit-variance inputs (Eq. 88)."""
    return (a * (1 - t) + b * t) / math.sqrt((1 - t) ** 2 + t**2)


def rms_normalize(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Pixel norm along the last dimension: every vector to unit RMS (EDM2's cosine attention, Sec. 3.3)."""
    return normalize(x, dim=-1, eps=eps)


def sincos_table_2d(grid: int, dim: int) -> np.ndarray:
    """The fixed 2-D sine-cosine positional table (grid² × dim) of ViT/MAE, computed in float64."""
    if dim % 4:
        raise ValueError(f"positional table needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    coords = np.arange(grid, dtype=np.float64)
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    parts = []
    for g in (gy, gx):
        angles = np.outer(g.reshape(-1), omega)  # (T, D/4)
        parts += [np.sin(angles), np.cos(angles)]
    return np.concatenate(parts, axis=1)  # (T, D)


def mp_sincos_table_2d(grid: int, dim: int) -> np.ndarray:
    """The sine-cosine table centred and scaled to unit RMS, so it can be mp_sum-merged with tokens.

    A single position has nothing to centre against (it would become all zeros): it is only scaled.
    """
    table = sincos_table_2d(grid, dim)
    if grid > 1:
        table = table - table.mean(axis=0, keepdims=True)
    return table / np.sqrt(np.mean(table**2))


def timestep_sinusoids(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoids of the raw timestep, as in DDPM/DiT (the rung-A time features)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ----------------------------------------------------------------------------
# Modules.


def row_rms(w: torch.Tensor) -> torch.Tensor:
    """RMS of every row of a 2-D weight, (out, 1), in one pass."""
    return torch.linalg.vector_norm(w, dim=1, keepdim=True) / math.sqrt(w.shape[1])


def row_scale(w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rms(w) per row and 1/((rms + ε)√fan_in): the factor that makes a row a unit-variance-preserving weight (Eq. 66)."""
    rms = row_rms(w)
    return rms, 1 / ((rms + eps) * math.sqrt(w.shape[1]))


class _ScaledRowNormalize(torch.autograd.Function):
    """gain · normalize(w) / √fan_in for a 2-D weight (Eq. 66), with a hand-written backward. `gain` is a scalar
    or one per row, (out, 1).

    Autograd through `normalize` walks the whole weight about ten times per step (square, mean, sqrt,
    division and their backward): for a DiT with few tokens per image, whose time goes to the weights,
    that made rung E 1.6× slower than rung A. Per row, with r = rms(w) and b = 1/((r + ε)√n), the output is
    g·b·w and, for an upstream gradient ḡ, ∂L/∂w = g·b·(ḡ − w·(ḡ·w)/((r + ε)·n·r)) and ∂L/∂g = Σ b·(ḡ·w).
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, gain: torch.Tensor | None, eps: float) -> torch.Tensor:
        rms, base = row_scale(w, eps)
        scale = base if gain is None else base * gain
        ctx.save_for_backward(w, rms, base, scale)
        ctx.eps, ctx.gain_ndim = eps, None if gain is None else gain.ndim
        return w * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, rms, base, scale = ctx.saved_tensors
        gain_ndim = ctx.gain_ndim
        dot = torch.einsum("oi,oi->o", grad, w).unsqueeze(1)  # (out, 1): ḡ·w per row, without a weight-sized product
        grad_w = grad_gain = None
        if ctx.needs_input_grad[0]:
            radial = scale * dot / ((rms + ctx.eps) * w.shape[1] * rms.clamp_min(torch.finfo(rms.dtype).tiny))
            grad_w = (grad * scale).addcmul_(w, radial, value=-1)  # the part along w is removed (Eq. 66's projection)
        if ctx.needs_input_grad[1]:
            grad_gain = base * dot  # (out, 1): per row
            grad_gain = grad_gain.sum() if gain_ndim == 0 else grad_gain
        return grad_w, grad_gain, None


class MPLinear(nn.Module):
    """Magnitude-preserving linear layer: no bias, N(0, 1) weights, weight normalization (Eq. 66).

    With `forced` weight normalization the stored weight is itself rewritten to unit-RMS rows while
    training (Eq. 67), so its scale cannot grow and the effective learning rate stays put.
    """

    eps = 1e-4

    def __init__(
        self,
        in_features: int,  # fan-in
        out_features: int,  # number of output rows
        gain: str = "one",  # "one" = fixed 1, "learned" = learned from 1, "zero" = learned from 0
        forced: bool = True,  # forced weight normalization while training
        gain_segments: Sequence[int] | None = None,  # learned gains: one per run of rows of these sizes; None = one
    ):
        super().__init__()
        self.in_features, self.out_features, self.forced = in_features, out_features, forced
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        if gain_segments is not None and sum(gain_segments) != out_features:
            raise ValueError(f"gain segments {list(gain_segments)} do not add up to {out_features} rows")
        shape = [] if gain_segments is None else [len(gain_segments)]
        self.gain = None if gain == "one" else nn.Parameter(torch.full(shape, 0.0 if gain == "zero" else 1.0))
        self.register_buffer(
            "gain_index",
            None
            if gain_segments is None
            else torch.arange(len(gain_segments)).repeat_interleave(torch.tensor(gain_segments), output_size=out_features),
            persistent=False,
        )  # (out,): the gain of every row
        self._frozen: torch.Tensor | None = None  # the effective weight, inside `frozen_weights` only
        self._freeze = False

    def row_gain(self) -> torch.Tensor | None:
        """The gain as a scalar, or one per row (out, 1); None when fixed at 1."""
        if self.gain is None or self.gain_index is None:
            return self.gain
        return self.gain[self.gain_index].unsqueeze(1)  # a gather of a few hundred values: free next to the matmul

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the heads had a gain each hold one gain for all rows: give it to every head.
        key = prefix + "gain"
        if self.gain is not None and key in state_dict and state_dict[key].shape != self.gain.shape and state_dict[key].ndim == 0:
            state_dict[key] = state_dict[key].expand(self.gain.shape).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def effective_weight(self) -> torch.Tensor:
        """gain · normalize(w) / √fan_in: the weight a unit-variance input sees."""
        if not self._freeze or self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return _ScaledRowNormalize.apply(self.weight, self.row_gain(), self.eps)  # compiled: fused into the graph
        if self._frozen is None:  # sampling runs the same weights hundreds of times: normalize them once
            with torch.no_grad():
                self._frozen = _ScaledRowNormalize.apply(self.weight, self.row_gain(), self.eps)
        return self._frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.forced:
            with torch.no_grad():
                self.weight.div_(row_rms(self.weight) + self.eps)  # Eq. 67, in place
        if (self.training or torch.is_grad_enabled()) and x.numel() < self.in_features**2:
            # Fewer input rows than fan-in (a modulation head sees one row per image): scaling the outputs
            # costs less than scaling every weight, and the weight's gradient is the plain matmul's.
            y = F.linear(x, self.weight)  # (..., out)
            scale = row_scale(self.weight, self.eps)[1]  # (out, 1)
            gain = self.row_gain()
            return y * (scale if gain is None else scale * gain)[:, 0].to(y.dtype)
        return F.linear(x, self.effective_weight())

    def extra_repr(self) -> str:
        gain = "one" if self.gain is None else "learned" if self.gain.ndim == 0 else f"learned x{self.gain.numel()}"
        return f"{self.in_features}, {self.out_features}, gain={gain}, forced={self.forced}"


@contextlib.contextmanager
def frozen_weights(module: nn.Module) -> Iterator[None]:
    """Inside, each MPLinear of `module` normalizes its weight once, at its first forward without grad, and keeps
    it: for sampling, where the weights cannot change. Nothing is kept outside, since weights also change where no
    version counter sees it (Lightning's EMA swaps them in through `.data`: a cache keyed on the parameter's
    version drew with stale weights after it)."""
    layers = [m for m in module.modules() if isinstance(m, MPLinear)]
    for layer in layers:
        layer._freeze, layer._frozen = True, None
    try:
        yield
    finally:
        for layer in layers:
            layer._freeze, layer._frozen = False, None


class MPFourier(nn.Module):
    """Fixed random Fourier features √2·cos(2π(f·s + φ)), unit variance for any s (Eq. 75); `gain` 1 gives the
    plain cosines of map-dit's old-mod_opts."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0, gain: float = math.sqrt(2)):
        super().__init__()
        self.gain = gain
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.gain * torch.cos(s.float()[:, None] * self.freqs[None] + self.phases[None])  # (N, C)


class MPEmbedding(nn.Module):
    """Class embedding table whose rows are forced to unit RMS, like MP linear weights (Eq. 67)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_embeddings, dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))
        return F.embedding(y, normalize(self.weight))
