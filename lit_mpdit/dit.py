"""The Diffusion Transformer with swappable conditioning and magnitude-preserving rung, in one file.

Rung A is the standard DiT (Peebles & Xie 2023); rung E is the normalization-free, fully
magnitude-preserving DiT of arXiv 2505.19122 built from EDM2's primitives (`lit_mpdit.nn.mp`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from lit_mpdit.conditioning import Conditioning, Head, rotate
from lit_mpdit.config import MPFlags, parse_size, resolve_mp
from lit_mpdit.errors import ConfigError
from lit_mpdit.nn.mp import (
    MPEmbedding,
    MPFourier,
    MPLinear,
    mp_silu,
    mp_sincos_table_2d,
    mp_sum,
    rms_normalize,
    sincos_table_2d,
    timestep_sinusoids,
)

RESIDUAL_T = 0.3  # mp_sum weight of a residual branch (EDM2)
MERGE_T = 0.5  # mp_sum weight when merging two embeddings
FREQ_CHANNELS = 256  # time features fed to the time MLP


@dataclass(frozen=True)
class DiTConfig:
    depth: int  # transformer blocks
    width: int  # token channels D
    heads: int  # attention heads
    patch: int  # patch side p
    input_size: int  # image (or latent) side
    in_channels: int  # image (or latent) channels C
    num_classes: int  # classes; index num_classes is the null class of classifier-free guidance
    conditioning: Conditioning
    mp: MPFlags
    learn_sigma: bool = True  # also predict the variance interpolation (2C outputs)
    mlp_ratio: float = 4.0
    num_timesteps: int = 1000  # diffusion steps the time embedding expects

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid(self) -> int:
        return self.input_size // self.patch

    @property
    def has_bias(self) -> bool:
        """Standard linear layers with a bias; MP layers never have one (a constant-1 input channel instead)."""
        return self.mp.bias and not self.mp.weight_norm

    @property
    def gate_head(self) -> Head:
        """The gate's head: a scalar per channel, or an angle per channel pair."""
        return Head("angle", 0.5) if self.mp.gate == "rotation" else Head("zero")


def linear(cfg: DiTConfig, fan_in: int, fan_out: int, gain: str = "one", gain_segments: list[int] | None = None) -> nn.Module:
    """Linear (rung A, with a bias unless `bias` is off) or MP linear (rung B up); `gain="zero"` starts at 0."""
    if cfg.mp.weight_norm:
        return MPLinear(fan_in, fan_out, gain=gain, forced=cfg.mp.forced_weight_norm, gain_segments=gain_segments)
    return nn.Linear(fan_in, fan_out, bias=cfg.has_bias)


def activation(cfg: DiTConfig, x: torch.Tensor, mlp: bool = False) -> torch.Tensor:
    """MP SiLU at rung D up; otherwise SiLU, and in MLPs DiT's GELU(tanh) unless `mlp_activation` says SiLU."""
    if cfg.mp.mp_silu:
        return mp_silu(x)
    return F.gelu(x, approximate="tanh") if mlp and cfg.mp.mlp_activation == "gelu" else F.silu(x)


def normalization(cfg: DiTConfig, x: torch.Tensor) -> torch.Tensor:
    """The pre-norm of every sub-block and of the final layer (no affine: modulation does that)."""
    if cfg.mp.norm == "layernorm":
        return F.layer_norm(x, x.shape[-1:], eps=1e-6)
    if cfg.mp.norm == "rmsnorm":
        return F.rms_norm(x, x.shape[-1:], eps=1e-6)
    return x


def linear_alphas_cumprod(num_timesteps: int) -> np.ndarray:
    """ᾱ_t of DDPM's linear β schedule, 1e-4 → 0.02 scaled to T steps (float64)."""
    scale = 1000 / num_timesteps
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    return np.cumprod(1 - betas)


# ----------------------------------------------------------------------------
# Embedders.


class PatchEmbedder(nn.Module):
    """Patches to tokens, plus the positional table. A conv with stride p is this linear map."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        fan_in = cfg.in_channels * cfg.patch**2 + int(not cfg.has_bias)  # no bias: a constant-1 channel instead
        self.proj = linear(cfg, fan_in, cfg.width)
        table = (mp_sincos_table_2d if cfg.mp.mp_pos_enc else sincos_table_2d)(cfg.grid, cfg.width)
        self.register_buffer("pos", torch.from_numpy(table).float()[None], persistent=False)  # (1, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)
        if not self.cfg.has_bias:
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)  # (N, T, Cp² + 1)
        x = self.proj(x)  # (N, T, D)
        return mp_sum(x, self.pos, MERGE_T) if self.cfg.mp.mp_pos_enc else x + self.pos


class TimestepEmbedder(nn.Module):
    """Time features → 2-layer MLP. The features (`time_embedding`): DiT's sinusoids of the step; EDM2's MP
    Fourier features of c_noise = ln(σ_t)/4 (`fourier`) or of the raw step (`fourier_step`, map-dit's final);
    or a learned table row per step (`table`, map-dit's morph)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        kind, channels = cfg.mp.time_embedding, cfg.mp.time_channels or cfg.width
        self.channels = channels
        self.fc1 = linear(cfg, channels, cfg.width)
        self.fc2 = linear(cfg, cfg.width, cfg.width)
        if kind in ("fourier", "fourier_step"):
            self.fourier = MPFourier(channels, gain=math.sqrt(2) if cfg.mp.fourier_sqrt2 else 1.0)
        if kind == "fourier":
            abar = linear_alphas_cumprod(cfg.num_timesteps)
            log_sigma = 0.5 * np.log((1 - abar) / abar)  # σ_t of the equivalent variance-exploding process
            self.register_buffer("c_noise", torch.from_numpy(log_sigma / 4).float(), persistent=False)
        if kind == "table":
            self.table = MPEmbedding(cfg.num_timesteps, channels) if cfg.mp.mp_embedding else nn.Embedding(cfg.num_timesteps, channels)

    def features(self, t: torch.Tensor) -> torch.Tensor:
        kind = self.cfg.mp.time_embedding
        if kind == "fourier":
            return self.fourier(self.c_noise[t.long()])  # (N, F)
        if kind == "fourier_step":
            return self.fourier(t.float())  # (N, F)
        if kind == "table":
            return self.table(t.long())  # (N, F)
        return timestep_sinusoids(t, self.channels)  # (N, F)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.cfg, self.fc1(self.features(t))))  # (N, D)


def label_embedder(cfg: DiTConfig) -> nn.Module:
    """One row per class plus the null class (index num_classes) of classifier-free guidance."""
    if cfg.mp.mp_embedding:
        return MPEmbedding(cfg.num_classes + 1, cfg.width)
    return nn.Embedding(cfg.num_classes + 1, cfg.width)


# ----------------------------------------------------------------------------
# Transformer block.


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√Dh) v, in float32 on CPUs: there torch's bfloat16 attention kernels are 3–8× slower than
    float32 for the short sequences of a DiT on small latents (16 or 49 tokens), which cancelled bf16-mixed's
    gain on the matrix products."""
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = linear(cfg, cfg.width, 3 * cfg.width)
        self.proj = linear(cfg, cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.cfg.heads, d // self.cfg.heads).permute(2, 0, 3, 1, 4)  # (N, H, T, Dh)
        if self.cfg.mp.cosine_attention:
            q, k = rms_normalize(q), rms_normalize(k)
        y = attention(q, k, v)  # (N, H, T, Dh)
        # The output is a convex combination of values, whose RMS falls as attention spreads (to 1/√T for
        # uniform weights): without a normalization layer depth erodes the signal unless it is restored, per
        # head before the projection (`heads`) or per token after it (`tokens`, map-dit's final).
        if self.cfg.mp.attention_output_norm == "heads":
            y = rms_normalize(y)
        out = self.proj(y.transpose(1, 2).reshape(n, t, d))  # (N, T, D)
        return rms_normalize(out) if self.cfg.mp.attention_output_norm == "tokens" else out


class MLP(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1 = linear(cfg, cfg.width, hidden)
        self.fc2 = linear(cfg, hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.cfg, self.fc1(x), mlp=True))  # (N, T, D)


class Block(nn.Module):
    """Pre-norm attention and MLP sub-blocks, each modulated by the strategy and gated."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def residual(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x ⊕ gate(y): AdaLN-Zero's x + g·y (a zero gate: the block starts as the identity), an open gate
        (1 + g)·y, or a rotation of y by the gate's angles; summed plainly or by mp_sum with MP residuals.
        mp_sum preserves magnitude only while the gated branch keeps unit RMS: a (1 + g) gate does so at
        initialisation only, a rotation always."""
        kind = self.cfg.mp.gate
        if kind == "scalar" and not self.cfg.mp.mp_residual:
            return torch.addcmul(x, gate, y)
        gated = rotate(y, gate) if kind == "rotation" else (1 + gate) * y if kind == "one_plus" else gate * y
        return mp_sum(x, gated, RESIDUAL_T) if self.cfg.mp.mp_residual else x + gated

    def forward(self, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        """x (N, T, D); `parts` the block's head outputs: the attention's operations and gate, then the MLP's."""
        cond, n = self.cfg.conditioning, len(self.cfg.conditioning.heads)
        attn_mod, attn_gate, mlp_mod, mlp_gate = parts[:n], parts[n], parts[n + 1 : 2 * n + 1], parts[2 * n + 1]
        x = self.residual(x, self.attn(cond.modulate(normalization(self.cfg, x), attn_mod)), attn_gate.unsqueeze(1))
        x = self.residual(x, self.mlp(cond.modulate(normalization(self.cfg, x), mlp_mod)), mlp_gate.unsqueeze(1))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """Norm, the strategy's modulation (no gate), then the output projection (zero-initialised unless its
    MP gain is fixed)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        gain = "zero" if cfg.mp.output_gain == "learned" else "one"
        self.proj = linear(cfg, cfg.width, cfg.patch**2 * cfg.out_channels, gain=gain)

    def forward(self, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        return self.proj(self.cfg.conditioning.modulate(normalization(self.cfg, x), parts))  # (N, T, p²·C_out)


# ----------------------------------------------------------------------------
# The network.


HEAD_LAYERS = {"zero": "modulation", "fixed": "modulation_fixed", "plain": "modulation_plain"}


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbedder(cfg)
        self.t_embed = TimestepEmbedder(cfg)
        self.y_embed = label_embedder(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg)
        self.build_heads()
        self.initialize_weights()

    def build_heads(self) -> None:
        """Every head φ(c) = Linear(act(c)) of every block and of the final layer, as at most three matrix
        products, one per kind of head: the condition is the same for every block. Each head's rows are a
        slice of its kind's output; in the MP rungs each zero-initialised head has its own learned gain
        (`gains: per_head`, as EDM2 and map-dit), or one per block (map-dit's morph), or one for all."""
        d, angle = self.cfg.width, "zero" if self.cfg.mp.angle_heads == "mp" else "plain"
        sub_block = [*self.cfg.conditioning.heads, self.cfg.gate_head]
        groups = [sub_block * 2] * self.cfg.depth + [list(self.cfg.conditioning.heads)]  # per block, then final
        rows: dict[str, list[tuple[int, int]]] = {kind: [] for kind in HEAD_LAYERS}  # kind → (group, width) per head
        self.slots: list[list[tuple[str, int]]] = []  # per group: (kind, index among its kind's heads) of every head
        for g, heads in enumerate(groups):
            slots = []
            for head in heads:
                kind = angle if head.kind == "angle" else head.kind
                slots.append((kind, len(rows[kind])))
                rows[kind].append((g, head.width(d)))
            self.slots.append(slots)
        self.head_widths = {kind: [w for _, w in heads] for kind, heads in rows.items() if heads}  # rows of every head, in order
        for kind, heads in rows.items():
            if not heads:
                continue
            width = sum(w for _, w in heads)
            if kind == "plain":
                layer = nn.Linear(d, width, bias=False)
            elif kind == "fixed":
                layer = linear(self.cfg, d, width)
            else:
                layer = linear(self.cfg, d, width, gain="zero", gain_segments=self.gain_segments(heads))
            setattr(self, HEAD_LAYERS[kind], layer)

    def gain_segments(self, heads: list[tuple[int, int]]) -> list[int] | None:
        """Rows per learned gain of the zero-initialised heads ((group, width) each)."""
        if self.cfg.mp.gains == "shared":
            return None
        if self.cfg.mp.gains == "per_head":
            return [w for _, w in heads]
        per_group: dict[int, int] = {}
        for g, w in heads:
            per_group[g] = per_group.get(g, 0) + w
        return list(per_group.values())

    def initialize_weights(self) -> None:
        """All initialisation in one place. MP layers initialise themselves (N(0, 1), gains 0 or 1)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.y_embed, nn.Embedding):
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for fc in (self.t_embed.fc1, self.t_embed.fc2):
            if isinstance(fc, nn.Linear):
                nn.init.normal_(fc.weight, std=0.02)
        zero_heads = [getattr(self, HEAD_LAYERS[k], None) for k in ("zero", "plain")] + [self.final.proj]
        for head in zero_heads:  # every modulation and the output start at zero
            if isinstance(head, nn.Linear):
                nn.init.zeros_(head.weight)
                if head.bias is not None:
                    nn.init.zeros_(head.bias)

    def head_outputs(self, c: torch.Tensor) -> list[list[torch.Tensor]]:
        """c (N, D) → every head's output (N, w), per block and then the final layer's. One split per kind of
        head, not a slice per head: a slice's backward writes a zero-filled gradient of the whole product and the
        slices' gradients are then summed (about 75 products' worth per step at S/4), a split's backward is one
        concatenation."""
        outs = {kind: getattr(self, HEAD_LAYERS[kind])(c).split(widths, dim=1) for kind, widths in self.head_widths.items()}
        return [[outs[kind][i] for kind, i in slots] for slots in self.slots]

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = time ⊕ class embedding, after the activation the modulation heads read."""
        te, ye = self.t_embed(t), self.y_embed(y)  # (N, D) each
        c = mp_sum(te, ye, MERGE_T) if self.cfg.mp.mp_embedding else te + ye
        return activation(self.cfg, c)  # (N, D)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, g, c = self.cfg.patch, self.cfg.grid, self.cfg.out_channels
        x = x.reshape(x.shape[0], g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (N, C, g, p, g, p)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), t (N,) integer steps, y (N,) labels → (N, C_out, H, W)."""
        h = self.patch_embed(x)  # (N, T, D)
        parts = self.head_outputs(self.condition(t, y))  # per block, then final
        for block, block_parts in zip(self.blocks, parts):
            h = block(h, block_parts)  # (N, T, D)
        return self.unpatchify(self.final(h, parts[-1]))  # (N, C_out, H, W)


def build_dit(
    size: str,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int,
    learn_sigma: bool = True,
    conditioning: str = "adaln",
    mp: str | MPFlags = "A",
    **overrides,
) -> DiT:
    """Build a DiT, e.g. build_dit('S/4', input_size=16, in_channels=4, num_classes=1000, mp='E').

    `overrides` may set any MP flag (`norm='rmsnorm'`, `cosine_attention=True`, ...) or `mlp_ratio`.
    Every bad option raises ConfigError naming what is allowed, before anything is allocated.
    """
    depth, width, heads, patch = parse_size(size)
    mlp_ratio = overrides.pop("mlp_ratio", 4.0)
    flags = resolve_mp(mp, **overrides)
    strategy = Conditioning.parse(conditioning)
    if input_size % patch:
        divisors = [p for p in (1, 2, 4, 8) if input_size % p == 0]
        raise ConfigError(f"model.size: patch size {patch} does not divide the input size {input_size}; allowed patch sizes: {divisors}")
    if (any(op.name == "rotation" for op in strategy.operations) or flags.gate == "rotation") and width % 2:
        raise ConfigError(f"model.conditioning: a rotation pairs channels and needs an even width, got {width}")
    for name, value in (("input_size", input_size), ("in_channels", in_channels), ("num_classes", num_classes)):
        if value < 1:
            raise ConfigError(f"model.{name}: must be a positive integer, got {value}")
    cfg = DiTConfig(depth, width, heads, patch, input_size, in_channels, num_classes, strategy, flags, learn_sigma, mlp_ratio)
    return DiT(cfg)
