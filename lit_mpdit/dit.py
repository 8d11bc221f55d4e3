"""The Diffusion Transformer with swappable conditioning and magnitude-preserving rung, in one file.

Rung A is the standard DiT (Peebles & Xie 2023); rung E is the normalization-free, fully
magnitude-preserving DiT of arXiv 2505.19122 built from EDM2's primitives (`lit_mpdit.nn.mp`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from lit_mpdit.conditioning import Conditioning
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
    def block_mod_width(self) -> int:
        """Head outputs per block: two sub-blocks, each with its strategy and a gate."""
        return 2 * (self.conditioning.width(self.width) + self.width)


def linear(cfg: DiTConfig, fan_in: int, fan_out: int, zero: bool = False) -> nn.Module:
    """Linear with bias (rung A) or MP linear (rung B up); `zero` heads start at 0 output."""
    if cfg.mp.weight_norm:
        return MPLinear(fan_in, fan_out, gain="zero" if zero else "one", forced=cfg.mp.forced_weight_norm)
    return nn.Linear(fan_in, fan_out)


def activation(cfg: DiTConfig, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """MP SiLU at rung D up; otherwise DiT's GELU(tanh) in MLPs and SiLU elsewhere."""
    if cfg.mp.mp_silu:
        return mp_silu(x)
    return F.gelu(x, approximate="tanh") if gelu else F.silu(x)


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
        fan_in = cfg.in_channels * cfg.patch**2 + int(cfg.mp.weight_norm)  # MP layers have no bias: a ones channel
        self.proj = linear(cfg, fan_in, cfg.width)
        table = (mp_sincos_table_2d if cfg.mp.mp_pos_enc else sincos_table_2d)(cfg.grid, cfg.width)
        self.register_buffer("pos", torch.from_numpy(table).float()[None], persistent=False)  # (1, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)
        if self.cfg.mp.weight_norm:
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)  # (N, T, Cp² + 1)
        x = self.proj(x)  # (N, T, D)
        return mp_sum(x, self.pos, MERGE_T) if self.cfg.mp.mp_pos_enc else x + self.pos


class TimestepEmbedder(nn.Module):
    """Time features → 2-layer MLP. MP rungs feed Fourier features of c_noise = ln(σ_t)/4, not raw t."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.fc1 = linear(cfg, FREQ_CHANNELS, cfg.width)
        self.fc2 = linear(cfg, cfg.width, cfg.width)
        if cfg.mp.mp_embedding:
            self.fourier = MPFourier(FREQ_CHANNELS)
            abar = linear_alphas_cumprod(cfg.num_timesteps)
            log_sigma = 0.5 * np.log((1 - abar) / abar)  # σ_t of the equivalent variance-exploding process
            self.register_buffer("c_noise", torch.from_numpy(log_sigma / 4).float(), persistent=False)

    def features(self, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.mp.mp_embedding:
            return self.fourier(self.c_noise[t.long()])  # (N, F)
        return timestep_sinusoids(t, FREQ_CHANNELS)  # (N, F)

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
        if self.cfg.mp.cosine_attention:
            # The output is a convex combination of values, whose RMS falls as attention spreads
            # (to 1/√T for uniform weights): restore unit RMS per head, or depth erodes the signal
            # of a normalization-free network.
            y = rms_normalize(y)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1 = linear(cfg, cfg.width, hidden)
        self.fc2 = linear(cfg, hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.cfg, self.fc1(x), gelu=True))  # (N, T, D)


class Block(nn.Module):
    """Pre-norm attention and MLP sub-blocks, each modulated by the strategy and gated."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def residual(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """AdaLN-Zero's x + g·y (zero gate: the block starts as the identity), or the MP sum."""
        if self.cfg.mp.mp_residual:
            return mp_sum(x, (1 + gate) * y, RESIDUAL_T)
        return torch.addcmul(x, gate, y)

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        cond, d = self.cfg.conditioning, self.cfg.width
        w = cond.width(d)
        attn_mod, attn_gate, mlp_mod, mlp_gate = mod.unsqueeze(1).split([w, d, w, d], dim=-1)  # (N, 1, ·)
        x = self.residual(x, self.attn(cond.modulate(normalization(self.cfg, x), attn_mod[:, 0])), attn_gate)
        x = self.residual(x, self.mlp(cond.modulate(normalization(self.cfg, x), mlp_mod[:, 0])), mlp_gate)
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """Norm, the strategy's modulation (no gate), then the zero-initialised output projection."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = linear(cfg, cfg.width, cfg.patch**2 * cfg.out_channels, zero=True)

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        return self.proj(self.cfg.conditioning.modulate(normalization(self.cfg, x), mod))  # (N, T, p²·C_out)


# ----------------------------------------------------------------------------
# The network.


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbedder(cfg)
        self.t_embed = TimestepEmbedder(cfg)
        self.y_embed = label_embedder(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg)
        # The condition is the same for every block: one head computes every block's modulation
        # (its rows are the per-operation heads φ(c) = Linear(act(c))), in one matrix product.
        self.mod_widths = [cfg.block_mod_width] * cfg.depth + [cfg.conditioning.width(cfg.width)]
        self.modulation = linear(cfg, cfg.width, sum(self.mod_widths), zero=True)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All initialisation in one place. MP layers initialise themselves (N(0, 1), gains 0 or 1)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.y_embed, nn.Embedding):
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for fc in (self.t_embed.fc1, self.t_embed.fc2):
            if isinstance(fc, nn.Linear):
                nn.init.normal_(fc.weight, std=0.02)
        for head in (self.modulation, self.final.proj):  # every modulation and the output start at zero
            if isinstance(head, nn.Linear):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

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
        mods = self.modulation(self.condition(t, y)).split(self.mod_widths, dim=-1)  # per block, then final
        for block, mod in zip(self.blocks, mods):
            h = block(h, mod)  # (N, T, D)
        return self.unpatchify(self.final(h, mods[-1]))  # (N, C_out, H, W)


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
    if any(op.name == "rotation" for op in strategy.operations) and width % 2:
        raise ConfigError(f"model.conditioning: a rotation pairs channels and needs an even width, got {width}")
    for name, value in (("input_size", input_size), ("in_channels", in_channels), ("num_classes", num_classes)):
        if value < 1:
            raise ConfigError(f"model.{name}: must be a positive integer, got {value}")
    cfg = DiTConfig(depth, width, heads, patch, input_size, in_channels, num_classes, strategy, flags, learn_sigma, mlp_ratio)
    return DiT(cfg)
