"""The DiT: parity with the reference parameter count, identities at initialisation, magnitudes at rung E."""
import dataclasses

import pytest
import torch

from lit_mpdit import build_dit
from lit_mpdit.conditioning import NAMED_STRATEGIES
from lit_mpdit.config import LADDER, PATCH_SIZES, SIZES
from lit_mpdit.errors import ConfigError


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(conditioning="adaln", mp="A", **kw):
    return build_dit("T/4", input_size=8, in_channels=2, num_classes=5, conditioning=conditioning, mp=mp, **kw)


def test_xl2_matches_reference_dit_parameter_count():
    with torch.device("meta"):  # count without allocating 2.7 GB
        model = build_dit("XL/2", input_size=32, in_channels=4, num_classes=1000, conditioning="adaln", mp="A")
    # The reference DiT-XL/2 has 675,129,632 counting its fixed positional table; ours is a buffer.
    assert n_params(model) == 674_834_720
    assert n_params(model) + model.patch_embed.pos.numel() == 675_129_632


@pytest.mark.parametrize("mp", ["A", "E"])
def test_rotation_scale_saves_about_five_and_a_half_percent_at_s4(mp):
    def count(cond):
        with torch.device("meta"):
            return n_params(build_dit("S/4", input_size=16, in_channels=4, num_classes=1000, conditioning=cond, mp=mp))

    saving = 1 - count("rotation+scale") / count("adaln")
    assert 0.053 < saving < 0.058, saving


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("patch", PATCH_SIZES)
def test_every_size_builds_with_its_table_entry(size, patch):
    with torch.device("meta"):
        model = build_dit(f"{size}/{patch}", input_size=32, in_channels=4, num_classes=10)
    depth, width, heads = SIZES[size]
    assert len(model.blocks) == depth and model.cfg.width == width and model.cfg.heads == heads


@pytest.mark.parametrize("rung", LADDER)
@pytest.mark.parametrize("conditioning", NAMED_STRATEGIES)
def test_every_rung_and_strategy_runs_forward_and_backward(rung, conditioning):
    torch.manual_seed(0)
    model = tiny(conditioning, rung)
    x = torch.randn(3, 2, 8, 8)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 4, 5]))  # 5 = the null class
    assert out.shape == (3, 4, 8, 8)  # learned Σ doubles the channels
    assert torch.count_nonzero(out) == 0  # the output projection starts at zero
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("conditioning", NAMED_STRATEGIES)
def test_rung_a_blocks_are_identities_at_initialisation(conditioning):
    model = tiny(conditioning, "A")
    h = torch.randn(2, 4, 128)
    mods = model.head_outputs(model.condition(torch.tensor([3, 7]), torch.tensor([1, 2])))
    for block, mod in zip(model.blocks, mods):
        torch.testing.assert_close(block(h, mod), h, rtol=0, atol=0)  # AdaLN-Zero: zero gates


def block_output_rms(model, tokens: int = 64, n: int = 16) -> list[float]:
    torch.manual_seed(1)
    h = torch.randn(n, tokens, model.cfg.width)  # unit-variance tokens
    rms = []
    with torch.no_grad():
        mods = model.head_outputs(model.condition(torch.randint(0, 1000, (n,)), torch.randint(0, 5, (n,))))
        for block, mod in zip(model.blocks, mods):
            h = block(h, mod)
            rms.append(h.square().mean().sqrt().item())
    return rms


@pytest.mark.parametrize("conditioning", NAMED_STRATEGIES)
def test_rung_e_keeps_block_output_rms_near_one(conditioning):
    torch.manual_seed(0)
    model = build_dit("S/2", input_size=16, in_channels=4, num_classes=5, conditioning=conditioning, mp="E").eval()
    rms_e = block_output_rms(model)
    print(f"{conditioning}: rung E per-block RMS", [round(r, 3) for r in rms_e])
    assert all(0.8 <= r <= 1.25 for r in rms_e), rms_e
    # For contrast: rung A only stays at 1 because its gates are zero; open them and it drifts.
    model_a = build_dit("S/2", input_size=16, in_channels=4, num_classes=5, conditioning=conditioning, mp="A").eval()
    with torch.no_grad():
        model_a.modulation.bias.fill_(1.0)
    print(f"{conditioning}: rung A per-block RMS with gates at 1", [round(r, 3) for r in block_output_rms(model_a)])


def test_ladder_is_cumulative():
    rungs = list(LADDER.values())
    for lower, higher in zip(rungs, rungs[1:]):
        for field in dataclasses.fields(lower):
            if field.name != "bias" and isinstance(getattr(lower, field.name), bool) and getattr(lower, field.name):
                assert getattr(higher, field.name), f"{field.name} lost going up the ladder"
    assert rungs[0].norm == "layernorm" and rungs[-1].norm == "none"
    assert rungs[0].bias and not any(r.bias for r in rungs[1:])  # MP layers trade the bias for a constant-1 channel


def test_flags_override_the_rung():
    model = tiny(mp="E", norm="rmsnorm", cosine_attention=False)
    assert model.cfg.mp.norm == "rmsnorm" and not model.cfg.mp.cosine_attention and model.cfg.mp.mp_residual


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(size="Q/4"), "model.size.*allowed: T/1"),
        (dict(size="S/3"), "model.size.*allowed: T/1"),
        (dict(size="C/8", input_size=28), "patch size 8 does not divide the input size 28; allowed patch sizes: \\[1, 2, 4\\]"),
        (dict(mp="F"), "model.mp.*allowed: 'A', 'B', 'C', 'D', 'E'"),
        (dict(conditioning="film"), "model.conditioning.*allowed"),
        (dict(norm="batchnorm"), "norm.*allowed: 'layernorm', 'rmsnorm', 'none'"),
        (dict(fancy_flag=True), "unknown magnitude-preserving flag"),
        (dict(num_classes=0), "model.num_classes"),
    ],
)
def test_bad_options_raise_one_clear_error(kwargs, message):
    args = dict(size="T/4", input_size=8, in_channels=1, num_classes=10) | kwargs
    with pytest.raises(ConfigError, match=message):
        build_dit(args.pop("size"), **args)


def test_bf16_autocast_forward():
    model = tiny(mp="E")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 2, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out.float()).all()


def test_attention_in_bf16_runs_in_float32_on_cpu_and_returns_bf16():
    from lit_mpdit.dit import attention

    q, k, v = torch.randn(3, 2, 4, 16, 8).unbind(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    exact = torch.nn.functional.scaled_dot_product_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    torch.testing.assert_close(out, exact.bfloat16())  # the float32 result rounded once, not bf16 arithmetic
