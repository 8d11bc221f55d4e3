"""Function parity with the paper's own code: each PAPER_VARIANTS model, given a map-dit model's random
parameters by the name map of `lit_mpdit.mapdit`, computes that model's output on a fixed batch.

The fixtures are map-dit's numbers, written by tools/mapdit_fixtures.py from a checkout of each branch (the
commit is in the file and checked below): `old-mod_opts` at c799d3749e8fcd4591caca7dabf011dd5dd15b6c (its five
strategies), `final` at 890190b4561dd24f5d9b1baea83b44fd5d5b09c5, `morph` at c345411e28f0d0dc518d3fb1122cf3c1940193f0
(every use_* flag off and on). What old-mod_opts computes differently, Fourier features without EDM2's √2, its
variants build themselves (`fourier_sqrt2=False`).

Three differences without a parameter are reproduced here rather than in the models, and are the only ones:
- ε, every branch: map-dit normalizes by ‖w‖ + 1e-4 (src/utils.py `normalize`), EDM2 and this suite by
  rms(w) + 1e-4 (lit_mpdit/nn/mp.py `normalize`), i.e. ‖w‖ + 1e-4·√n: a relative 1e-4 on every normalized
  vector, set to map-dit's placement below. Kept: it is EDM2's, the primitives' source, and moving it would
  change every MP model of this suite;
- the positional table, every branch: map-dit puts the column coordinate in the first half of the channels
  (MAE's order) and, in its MP models, normalizes each token's row, after centring it over its channels
  (old-mod_opts) or the whole table by its mean (final), where this suite puts the row first and centres the
  table over positions (lit_mpdit/nn/mp.py `sincos_table_2d`, `mp_sincos_table_2d`): the fixture's table is
  loaded. Kept: a buffer, one table for every model here where each branch has its own;
- the MP shift's blend offset, final: sigmoid(ψ − 2.1972) (src/layers/rotation_modulation.py `shift_net`), here
  sigmoid(ψ + logit(0.1)) with logit(0.1) = −2.1972246 (lit_mpdit/conditioning.py `mpshift`): the test sets
  map-dit's constant, without which the outputs differ by 3e-5. Kept: both start the blend at 0.1, map-dit's
  constant is that logit rounded to four decimals.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import lit_mpdit.conditioning as conditioning
import lit_mpdit.nn.mp as mp
from lit_mpdit.conditioning import Conditioning
from lit_mpdit.config import PAPER_VARIANTS, model_design
from lit_mpdit.dit import DiT, DiTConfig
from lit_mpdit.mapdit import state_dict_from_mapdit

DATA = Path(__file__).parent / "data"
MAPDIT_BLEND_OFFSET = -2.1972  # final, src/layers/rotation_modulation.py: sigmoid(ψ − 2.1972)
COMMITS = {
    "old-mod_opts": "c799d3749e8fcd4591caca7dabf011dd5dd15b6c",
    "final": "890190b4561dd24f5d9b1baea83b44fd5d5b09c5",
    "morph": "c345411e28f0d0dc518d3fb1122cf3c1940193f0",
}


def fixture(branch: str) -> dict:
    return torch.load(DATA / f"mapdit_{branch}.pt", weights_only=True)


def tiny_variant(name: str, size: dict) -> DiT:
    """The variant at the fixture's size (depth 2, width 32, MLPs of width 32: no named size of this suite)."""
    design = model_design(name, None, None, None, None)
    cfg = DiTConfig(
        size["depth"], size["hidden_size"], size["num_heads"], size["patch_size"], size["input_size"],
        size["in_channels"], size["num_classes"], Conditioning.parse(design["conditioning"]), design["mp"],
        mlp_ratio=size["mlp_ratio"],
    )
    return DiT(cfg)


@pytest.fixture
def mapdit_eps(monkeypatch):
    """ε where map-dit puts it: rms(w) + ε/√n is ‖w‖/√n + ε/√n, i.e. map-dit's ‖w‖ + ε up to the factor √n."""
    normalize = mp.normalize

    def at_norm(w, dim=None, eps=1e-4):
        dims = tuple(range(1, w.ndim)) if dim is None else (dim,) if isinstance(dim, int) else dim
        return normalize(w, dim=dim, eps=eps / math.sqrt(math.prod(w.shape[d] for d in dims)))

    monkeypatch.setattr(mp, "normalize", at_norm)

    def apply(net: DiT) -> None:
        for m in net.modules():
            if isinstance(m, mp.MPLinear):
                m.eps = mp.MPLinear.eps / math.sqrt(m.in_features)

    return apply


CASES = [(branch, name) for branch in COMMITS for name in fixture(branch)["models"]]


@pytest.mark.parametrize("branch,name", CASES, ids=[name for _, name in CASES])
def test_variant_computes_the_paper_models_function(branch, name, mapdit_eps, monkeypatch):
    data = fixture(branch)
    theirs = data["models"][name]
    net = tiny_variant(name, data["size"]).eval()
    mapdit_eps(net)
    if branch == "final":  # the blend's offset as map-dit writes it
        monkeypatch.setattr(conditioning, "MPSHIFT_START", 1 / (1 + math.exp(-MAPDIT_BLEND_OFFSET)))
    net.load_state_dict(state_dict_from_mapdit(theirs["state_dict"], net, branch))  # strict: every tensor of ours is given
    net.patch_embed.pos.copy_(theirs["state_dict"]["pos_embed"])
    with torch.no_grad():
        ours = net(data["x"], data["t"], data["y"])
    # Outputs reach ±7 with random gains: float32's rounding there is ~1e-6, relative.
    torch.testing.assert_close(ours, theirs["output"], atol=1e-5, rtol=1e-5)


def test_fixtures_are_of_the_named_commits():
    assert {branch: fixture(branch)["commit"] for branch in COMMITS} == COMMITS


def test_every_variant_has_a_fixture():
    assert {name for _, name in CASES} == set(PAPER_VARIANTS)


def test_the_map_is_needed(mapdit_eps):
    """The comparison can fail: the same parameters with one permutation left out give another function."""
    data = fixture("morph")
    theirs = data["models"]["morph/E"]
    net = tiny_variant("morph/E", data["size"]).eval()
    mapdit_eps(net)
    state = state_dict_from_mapdit(theirs["state_dict"], net, "morph")
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"].roll(net.cfg.width, dims=0)  # k, v, q for q, k, v
    net.load_state_dict(state, strict=False)
    net.patch_embed.pos.copy_(theirs["state_dict"]["pos_embed"])
    with torch.no_grad():
        assert (net(data["x"], data["t"], data["y"]) - theirs["output"]).abs().max() > 1e-2
