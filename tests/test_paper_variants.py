"""The paper's own models (ericbill21/map-dit, one per branch), rebuilt from this suite's options.

The expected parameter counts were computed by instantiating each branch's DiT-S/4 on 16×16×4 latents with
1000 classes outside this repository (`tools/mapdit_counts.py`, on the branches' heads: old-mod_opts c799d37,
final 890190b, morph c345411); the anchor 32,849,739 is the one the faithful-models issue quotes.
"""
import math

import pytest
import torch

from lit_mpdit import build_dit
from lit_mpdit.config import PAPER_VARIANTS
from lit_mpdit.dit import RESIDUAL_T
from lit_mpdit.errors import ConfigError
from lit_mpdit.module import DiffusionModule
from test_dit import block_output_rms, n_params

MAPDIT_S4_PARAMS = {
    "old-mod_opts/adaln": 32_849_739,
    "old-mod_opts/shift": 29_163_314,
    "old-mod_opts/scale": 29_163_314,
    "old-mod_opts/rotation": 27_320_114,
    "old-mod_opts/rotation+scale": 31_006_539,
    "final": 29_246_592,
    "morph/A": 32_898_816,
    "morph/E": 33_282_830,
}


def test_every_variant_has_a_reference_count():
    assert set(PAPER_VARIANTS) == set(MAPDIT_S4_PARAMS)


@pytest.mark.parametrize("name", PAPER_VARIANTS)
def test_exact_parameter_parity_with_the_papers_code(name):
    with torch.device("meta"):
        model = build_dit("S/4", input_size=16, in_channels=4, num_classes=1000, **PAPER_VARIANTS[name])
    assert n_params(model) == MAPDIT_S4_PARAMS[name]


def s2(name):
    torch.manual_seed(0)
    return build_dit("S/2", input_size=16, in_channels=4, num_classes=5, **PAPER_VARIANTS[name]).eval()


def test_final_keeps_block_output_rms_near_one():
    # Attention normalized after its projection, rotations as gates and the MP shift blend: every block keeps
    # unit RMS at initialisation, although the blend already mixes in 10% of the shift.
    rms = block_output_rms(s2("final"))
    assert all(0.8 <= r <= 1.25 for r in rms), rms


def test_morph_a_blocks_are_identities_at_initialisation():
    rms = block_output_rms(s2("morph/A"))
    torch.testing.assert_close(torch.tensor(rms), torch.full((len(rms),), rms[0]))  # closed AdaLN-Zero gates


def test_morph_e_shrinks_every_block_by_the_closed_mp_residual():
    # As that branch has it: a gate g·y that starts at 0 inside mp_sum(x, g·y, 0.3) scales x by 0.7/√0.58
    # per sub-block, so the stream shrinks to 13% after 12 blocks at initialisation.
    factor = ((1 - RESIDUAL_T) / math.sqrt((1 - RESIDUAL_T) ** 2 + RESIDUAL_T**2)) ** 2
    rms = block_output_rms(s2("morph/E"))
    ratios = [b / a for a, b in zip(rms, rms[1:])]
    torch.testing.assert_close(torch.tensor(ratios), torch.full((len(ratios),), factor), rtol=1e-3, atol=0)


@pytest.mark.parametrize("strategy", ["adaln", "shift", "scale", "rotation", "rotation+scale"])
def test_old_mod_opts_loses_magnitude_with_depth_where_our_rung_e_does_not(strategy):
    # The branch's cosine attention leaves the attention output a convex combination of values, below unit
    # RMS; with open (1 + g) gates and no normalization the stream shrinks block after block. Our rung E
    # restores each head's output to unit RMS and keeps the stream at 1 (tests/test_dit.py).
    rms = block_output_rms(s2(f"old-mod_opts/{strategy}"))
    assert all(b < a for a, b in zip(rms, rms[1:])) and rms[-1] < 0.5, rms


@pytest.mark.parametrize("name", PAPER_VARIANTS)
def test_every_variant_trains_forward_and_backward(name):
    torch.manual_seed(0)
    model = build_dit("T/4", input_size=8, in_channels=2, num_classes=5, **PAPER_VARIANTS[name])
    out = model(torch.randn(3, 2, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 4, 5]))
    assert out.shape == (3, 4, 8, 8) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_variant_option_builds_the_variant_and_refuses_contradictions():
    module = DiffusionModule(size="T/4", variant="final")
    assert module.net.cfg.conditioning.name == "rotation+mpshift" and module.net.cfg.mp.gate == "rotation"
    assert DiffusionModule(size="T/4", variant="final", mp="E").net.cfg.mp.norm == "none"  # agreeing: accepted
    with pytest.raises(ConfigError, match="model.conditioning: 'adaln' contradicts model.variant 'final'"):
        DiffusionModule(size="T/4", variant="final", conditioning="adaln")
    with pytest.raises(ConfigError, match="model.flags.gate: 'scalar' contradicts"):
        DiffusionModule(size="T/4", variant="final", flags={"gate": "scalar"})
    with pytest.raises(ConfigError, match="model.variant: unknown value 'nope'; allowed: 'old-mod_opts/adaln'.*'final'"):
        DiffusionModule(size="T/4", variant="nope")


def zero_head_gain_grad(model, block: int, head: int) -> torch.Tensor:
    """The gradient of the zero-initialised heads' gains from one head of one block alone."""
    c = model.condition(torch.tensor([10, 900]), torch.tensor([1, 3]))
    model.head_outputs(c)[block][head].square().sum().backward()
    return model.modulation.gain.grad


def test_every_head_has_its_own_gain():
    model = build_dit("T/4", input_size=8, in_channels=2, num_classes=5, conditioning="adaln", mp="E")
    heads_per_block = 2 * (2 + 1)  # two sub-blocks, each scale, shift and gate
    assert model.modulation.gain.shape == (len(model.blocks) * heads_per_block + 2,)  # + the final layer's two
    with torch.no_grad():
        model.modulation.gain.fill_(0.5)  # open, so every head's output depends on its gain
    grad = zero_head_gain_grad(model, block=1, head=2)  # block 1's attention gate
    assert torch.count_nonzero(grad) == 1 and grad[heads_per_block + 2] != 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.modulation.gain.detach().clone()
    opt.step()
    moved = (model.modulation.gain.detach() != before).nonzero().flatten().tolist()
    assert moved == [heads_per_block + 2]  # one block's gain moved, no other's


def test_morph_e_has_one_gain_per_block():
    model = build_dit("T/4", input_size=8, in_channels=2, num_classes=5, **PAPER_VARIANTS["morph/E"])
    assert model.modulation.gain.shape == (len(model.blocks) + 1,)
    with torch.no_grad():
        model.modulation.gain.fill_(0.5)
    grad = zero_head_gain_grad(model, block=2, head=4)
    assert grad.nonzero().flatten().tolist() == [2]


def test_checkpoints_with_one_shared_head_gain_still_load():
    model = build_dit("T/4", input_size=8, in_channels=2, num_classes=5, mp="E")
    state = model.state_dict()
    state["modulation.gain"] = torch.tensor(0.25)  # how the heads' gain was stored before it was per head
    model.load_state_dict(state)
    assert torch.equal(model.modulation.gain.detach(), torch.full_like(model.modulation.gain, 0.25))
