"""State dicts of the paper's own code (ericbill21/map-dit) mapped onto this suite's DiT.

The name map behind the function-parity test (tests/test_mapdit_parity.py): a map-dit model's parameters,
renamed and re-laid-out, give the `PAPER_VARIANTS` model built here the same function, for each of the branches
old-mod_opts, final and morph. What differs in layout:

- patches: map-dit flattens a patch as (row, column, channel), this suite as (channel, row, column), both with
  the constant-1 channel last: the patch embedding's columns and the output projection's rows are permuted;
- attention: morph's q, k, v projections are one `qkv` matrix here (rows q, k, v; the other branches have one);
- modulation heads: here one matrix holds every head of a kind (`HEAD_LAYERS`), block after block then the final
  layer's, each block's heads in the strategy's order and then the gate, for attention and then the MLP
  (`DiT.build_heads`). morph has one AdaLN matrix per block and one in the final layer, chunked shift, scale,
  gate; old-mod_opts and final have a module per head.

What differs without a parameter is not mapped, and the test states it: the positional table (a buffer) and
where ε enters every normalization; final's blend offset, a constant.
"""
from __future__ import annotations

import torch

from lit_mpdit.dit import HEAD_LAYERS, DiT

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


def morph_heads(theirs: dict[str, torch.Tensor], net: DiT) -> dict[str, torch.Tensor]:
    """The AdaLN heads of branch morph as this suite's head matrix and gains."""
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


def head_modules(branch: str, net: DiT) -> list[list[str]]:
    """Per block and then the final layer, the map-dit module of each of this suite's heads, in their order."""
    if branch == "old-mod_opts":  # ModulationSequential: a module per operation, in the order scale, shift, rotation
        ops = range(len(net.cfg.conditioning.operations))
        sub_block = lambda i, s: [*(f"blocks.{i}.mod{s}.mods.{j}.net.1" for j in ops), f"blocks.{i}.gate{s}.net.1"]  # noqa: E731
        final = [f"final_layer.mod.mods.{j}.net.1" for j in ops]
        subs = (1, 2)
    else:  # final's RotationModulation: θ, the MP shift and its blend ψ, then the gate's angles
        heads = ("scale_net.net.1", "shift_net.net.1", "shift_net.blend.1")
        sub_block = lambda i, m: [*(f"blocks.{i}.{m}.{h}" for h in heads), f"blocks.{i}.{m}.gate_net.net.1"]  # noqa: E731
        final = [f"final_layer.modulation.{h}" for h in heads]
        subs = ("mod_msa", "mod_mlp")
    return [[*sub_block(i, subs[0]), *sub_block(i, subs[1])] for i in range(net.cfg.depth)] + [final]


def separate_heads(theirs: dict[str, torch.Tensor], net: DiT, branch: str) -> dict[str, torch.Tensor]:
    """The heads of branch old-mod_opts or final, a module each, as this suite's head matrices and gains."""
    cfg = net.cfg
    gate = {"old-mod_opts": "one_plus", "final": "rotation"}[branch]  # (1 + g)·y; y rotated by the gate's angles
    if cfg.mp.gate != gate:
        raise ValueError(f"map-dit's {branch} gates map onto gate {gate}, not {cfg.mp.gate}")
    rows: dict[str, list[torch.Tensor]] = {kind: [] for kind in HEAD_LAYERS}
    gains: list[torch.Tensor] = []
    for slots, modules in zip(net.slots, head_modules(branch, net), strict=True):
        for (kind, _), module in zip(slots, modules, strict=True):  # each kind's heads come in the order of `slots`
            rows[kind].append(theirs[f"{module}.weight"])
            if f"{module}.gain" in theirs:
                gains.append(theirs[f"{module}.gain"])
    out = {f"{HEAD_LAYERS[kind]}.weight": torch.cat(heads) for kind, heads in rows.items() if heads}
    if gains:  # only the zero-initialised heads have one
        out["modulation.gain"] = torch.stack(gains)
    return out


def state_dict_from_mapdit(theirs: dict[str, torch.Tensor], net: DiT, branch: str) -> dict[str, torch.Tensor]:
    """A map-dit DiT's state dict of the given branch as `net`'s, by the name map above."""
    cfg = net.cfg
    p, c = cfg.patch, cfg.in_channels
    t_mlp = "t_embedder.mlp." if branch == "final" else "t_embedder.mlp.net."
    ours = {
        "patch_embed.proj.weight": patch_columns(theirs["x_embedder.weight"], p, c),
        "t_embed.fc1.weight": theirs[t_mlp + "0.weight"],
        "t_embed.fc2.weight": theirs[t_mlp + "2.weight"],
        "y_embed.weight": theirs["y_embedder.embedding_table.weight" if branch == "final" else "y_embedder.embedding.weight"],
        "final.proj.weight": output_rows(theirs["final_layer.linear.weight"], p, cfg.out_channels),
        **(morph_heads(theirs, net) if branch == "morph" else separate_heads(theirs, net, branch)),
    }
    if "t_embedder.embedding.weight" in theirs:  # a learned table row per step
        ours["t_embed.table.weight"] = theirs["t_embedder.embedding.weight"]
    if "t_embedder.embedding.scale" in theirs:  # Fourier features: buffers already multiplied by 2π, as ours
        ours["t_embed.fourier.freqs"] = theirs["t_embedder.embedding.scale"]
        ours["t_embed.fourier.phases"] = theirs["t_embedder.embedding.shift"]
    if "final_layer.linear.gain" in theirs:
        ours["final.proj.gain"] = theirs["final_layer.linear.gain"]
    for i in range(cfg.depth):
        a, b = f"blocks.{i}.", f"blocks.{i}."
        if branch == "morph":
            ours[b + "attn.qkv.weight"] = torch.cat([theirs[f"{a}attn.{x}_proj.weight"] for x in "qkv"])
        else:  # one matrix, rows q, k, v, each normalized per row
            ours[b + "attn.qkv.weight"] = theirs[a + ("attn.qkv_weight" if branch == "final" else "attn.qkv_proj.weight")]
        ours[b + "attn.proj.weight"] = theirs[a + "attn.out_proj.weight"]
        ours[b + "mlp.fc1.weight"] = theirs[a + "mlp.net.0.weight"]
        ours[b + "mlp.fc2.weight"] = theirs[a + "mlp.net.2.weight"]
    return {k: v.float() for k, v in ours.items()}
