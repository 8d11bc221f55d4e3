"""State dicts of the paper's own code (ericbill21/map-dit) mapped onto this suite's DiT.

The name map behind the function-parity test (tests/test_mapdit_parity.py): a map-dit model's parameters,
renamed and re-laid-out, give the `PAPER_VARIANTS` model built here the same function. What differs in layout:

- patches: map-dit flattens a patch as (row, column, channel), this suite as (channel, row, column), both with
  the constant-1 channel last: the patch embedding's columns and the output projection's rows are permuted;
- attention: map-dit's q, k, v projections are one `qkv` matrix here (rows q, k, v);
- modulation heads: map-dit has a head matrix per block and one in the final layer, chunked shift, scale, gate;
  here one matrix holds every head of a kind, block after block then the final layer's, each block's rows in
  the strategy's order (scale, shift, ..., then the gate) for attention and then the MLP (`DiT.build_heads`).

What differs without a parameter is not mapped, and the test states it: the positional table (a buffer) and
where ε enters every normalization.
"""
from __future__ import annotations

import torch

from lit_mpdit.dit import DiT

# map-dit's chunks of a block's AdaLN head (src/blocks/dit_block.py) and of the final layer's
MAPDIT_BLOCK_CHUNKS = ("shift", "scale", "gate", "shift", "scale", "gate")
MAPDIT_FINAL_CHUNKS = ("shift", "scale")


def patch_columns(w: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(D, p·p·C + 1) in map-dit's (row, column, channel) order → this suite's (channel, row, column)."""
    body = w[:, :-1].reshape(w.shape[0], patch, patch, channels).permute(0, 3, 1, 2).reshape(w.shape[0], -1)
    return torch.cat([body, w[:, -1:]], dim=1)


def output_rows(w: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(p·p·C_out, D) rows in map-dit's (row, column, channel) order → (channel, row, column)."""
    return w.reshape(patch, patch, channels, -1).permute(2, 0, 1, 3).reshape(w.shape)


def heads_from_mapdit(theirs: dict[str, torch.Tensor], net: DiT) -> dict[str, torch.Tensor]:
    """The modulation heads of a map-dit AdaLN model (branch morph) as this suite's head matrix and gains."""
    cfg = net.cfg
    names = [op.name for op in cfg.conditioning.operations]
    if names != ["scale", "shift"] or cfg.mp.gate != "scalar":
        raise ValueError(f"map-dit's AdaLN heads map onto adaln with scalar gates, not {cfg.conditioning.name} with {cfg.mp.gate}")
    groups = [(f"blocks.{i}.modulation.net.1", MAPDIT_BLOCK_CHUNKS) for i in range(cfg.depth)]
    groups.append(("final_layer.modulation.net.1", MAPDIT_FINAL_CHUNKS))
    rows, gains = [], []
    for prefix, chunks in groups:
        parts = theirs[f"{prefix}.weight"].chunk(len(chunks))
        sub_blocks = [dict(zip(chunks[i : i + 3], parts[i : i + 3])) for i in range(0, len(chunks), 3)]
        rows += [part[name] for part in sub_blocks for name in ("scale", "shift", "gate") if name in part]
        if f"{prefix}.gain" in theirs:
            gains.append(theirs[f"{prefix}.gain"])
    out = {"modulation.weight": torch.cat(rows)}
    if gains:  # one gain per block's head, as this suite's `gains: per_block`
        out["modulation.gain"] = torch.stack(gains).reshape(net.modulation.gain.shape)
    return out


def state_dict_from_mapdit(theirs: dict[str, torch.Tensor], net: DiT) -> dict[str, torch.Tensor]:
    """A map-dit DiT's state dict (branch morph) as `net`'s, by the name map above."""
    cfg = net.cfg
    p, c = cfg.patch, cfg.in_channels
    ours = {
        "patch_embed.proj.weight": patch_columns(theirs["x_embedder.weight"], p, c),
        "t_embed.fc1.weight": theirs["t_embedder.mlp.net.0.weight"],
        "t_embed.fc2.weight": theirs["t_embedder.mlp.net.2.weight"],
        "y_embed.weight": theirs["y_embedder.embedding.weight"],
        "final.proj.weight": output_rows(theirs["final_layer.linear.weight"], p, cfg.out_channels),
        **heads_from_mapdit(theirs, net),
    }
    if "t_embedder.embedding.weight" in theirs:  # a learned table row per step
        ours["t_embed.table.weight"] = theirs["t_embedder.embedding.weight"]
    if "final_layer.linear.gain" in theirs:
        ours["final.proj.gain"] = theirs["final_layer.linear.gain"]
    for i in range(cfg.depth):
        a, b = f"blocks.{i}.", f"blocks.{i}."
        ours[b + "attn.qkv.weight"] = torch.cat([theirs[f"{a}attn.{x}_proj.weight"] for x in "qkv"])
        ours[b + "attn.proj.weight"] = theirs[a + "attn.out_proj.weight"]
        ours[b + "mlp.fc1.weight"] = theirs[a + "mlp.net.0.weight"]
        ours[b + "mlp.fc2.weight"] = theirs[a + "mlp.net.2.weight"]
    return {k: v.float() for k, v in ours.items()}
