"""What a network costs: parameters (the denoiser only, never the metric's Inception) and FLOPs."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from lit_mpdit.dit import DiT


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@torch.no_grad()
def forward_gflops(net: DiT, batch: int = 1) -> float:
    """GFLOPs of one forward pass per image (multiply-adds count 2), counted by torch's FLOP counter."""
    cfg = net.cfg
    x = torch.zeros(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=next(net.parameters()).device)
    t = torch.zeros(batch, dtype=torch.long, device=x.device)
    counter = FlopCounterMode(display=False)
    with counter:
        net(x, t, t)
    return counter.get_total_flops() / batch / 1e9
