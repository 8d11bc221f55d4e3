"""Conditioning strategies: identities at initialisation, rotations preserve norms, a registry that refuses unknown names."""
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from lit_mpdit.conditioning import NAMED_STRATEGIES, OPERATIONS, Conditioning, PairAffine, mpshift, rotate, rotation, scale, shift
from lit_mpdit.errors import ConfigError

ALL = [*NAMED_STRATEGIES, *OPERATIONS, "scale+shift+rotation"]
IDENTITY_AT_ZERO = [name for name in ALL if all(op.identity_at_zero for op in Conditioning.parse(name).operations)]


@settings(deadline=None, max_examples=50)
@given(d=st.integers(1, 64).map(lambda k: 2 * k), seed=st.integers(0, 10_000), angle_scale=st.floats(0.0, 100.0))
def test_rotation_preserves_every_token_norm(d, seed, angle_scale):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 5, d, generator=g, dtype=torch.float64)
    theta = torch.randn(3, 1, d // 2, generator=g, dtype=torch.float64) * angle_scale
    out = rotate(h, theta)
    torch.testing.assert_close(out.norm(dim=-1), h.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rotation_is_a_pairwise_2d_rotation_and_inverts():
    h = torch.randn(2, 3, 8, dtype=torch.float64)
    theta = torch.randn(2, 1, 4, dtype=torch.float64)
    out = rotate(h, theta)
    i, j = 1, 1 + 4  # channel i pairs with i + D/2
    c, s = torch.cos(theta[..., 1]), torch.sin(theta[..., 1])
    torch.testing.assert_close(out[..., i], h[..., i] * c - h[..., j] * s)
    torch.testing.assert_close(out[..., j], h[..., i] * s + h[..., j] * c)
    torch.testing.assert_close(rotate(out, -theta), h)
    quarter = torch.full((2, 1, 4), math.pi / 2, dtype=torch.float64)
    torch.testing.assert_close(rotate(h, quarter), torch.cat([-h[..., 4:], h[..., :4]], dim=-1))


@pytest.mark.parametrize("name", IDENTITY_AT_ZERO)
def test_every_strategy_is_identity_with_zero_head(name):
    cond = Conditioning.parse(name)
    h = torch.randn(4, 6, 32)
    params = torch.zeros(4, cond.width(32))
    torch.testing.assert_close(cond.modulate(h, params), h, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_every_strategy_changes_tokens_with_nonzero_head(name):
    cond = Conditioning.parse(name)
    h = torch.randn(4, 6, 32)
    assert not torch.allclose(cond.modulate(h, torch.full((4, cond.width(32)), 0.3)), h)


@pytest.mark.parametrize(
    "name, ops, width",
    [
        ("adaln", ("scale", "shift"), 64),
        ("shift", ("shift",), 32),
        ("scale", ("scale",), 32),
        ("rotation", ("rotation",), 16),
        ("rotation+scale", ("scale", "rotation"), 48),
        ("scale+rotation", ("scale", "rotation"), 48),
        ("adaln+rotation", ("scale", "shift", "rotation"), 80),
    ],
)
def test_strategies_parse_to_ordered_operations(name, ops, width):
    cond = Conditioning.parse(name)
    assert tuple(op.name for op in cond.operations) == ops
    assert cond.width(32) == width  # a rotation needs half the head outputs of a shift


def test_modulation_applies_scale_then_shift_then_rotation():
    cond = Conditioning.parse("adaln+rotation")
    h = torch.randn(2, 3, 8)
    s, b, th = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 4)
    expected = rotate(h * (1 + s[:, None]) + b[:, None], th[:, None])
    torch.testing.assert_close(cond.modulate(h, torch.cat([s, b, th], dim=-1)), expected)


@pytest.mark.parametrize("bad", ["bogus", "rotation+bogus", "", "AdaLN"])
def test_unknown_strategy_names_the_allowed_ones(bad):
    with pytest.raises(ConfigError, match="model.conditioning.*allowed: adaln, shift, scale, rotation, rotation\\+scale"):
        Conditioning.parse(bad)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 10_000), order=st.permutations(["scale", "shift", "rotation", "rotation"]))
def test_composed_affine_equals_applying_the_operations_one_by_one(seed, order):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    make = {"scale": (scale, 8), "shift": (shift, 8), "rotation": (rotation, 4)}
    steps = [make[name][0](torch.randn(2, 1, make[name][1], generator=g, dtype=torch.float64)) for name in order]
    composed, expected = PairAffine(torch.ones(1, 1, 8, dtype=torch.float64)), h
    for step in steps:
        composed, expected = composed.then(step), step(expected)
    torch.testing.assert_close(composed(h), expected)


def test_only_the_mp_shift_is_not_the_identity_at_zero():
    assert [name for name in ALL if name not in IDENTITY_AT_ZERO] == ["mpshift"]


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 10_000), psi=st.floats(-8.0, 8.0))
def test_mp_shift_is_a_magnitude_preserving_blend_starting_at_a_tenth(seed, psi):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(64, 16, 256, generator=g, dtype=torch.float64)  # unit RMS
    b = torch.randn(64, 1, 256, generator=g, dtype=torch.float64)  # unit RMS, independent of h
    out = mpshift(b, torch.full((64, 1, 1), psi, dtype=torch.float64))(h)
    assert out.square().mean().sqrt().item() == pytest.approx(1.0, abs=0.03)
    t = 0.1  # ψ = 0 is the blend map-dit starts from: sigmoid(logit(0.1))
    expected = ((1 - t) * h + t * b) / math.sqrt((1 - t) ** 2 + t**2)
    torch.testing.assert_close(mpshift(b, torch.zeros(64, 1, 1, dtype=torch.float64))(h), expected)


def test_final_strategy_rotates_then_blends_the_shift():
    cond = Conditioning.parse("rotation+mpshift")
    h = torch.randn(2, 3, 8)
    th, b, psi = torch.randn(2, 4), torch.randn(2, 8), torch.randn(2, 1)
    expected = mpshift(b[:, None], psi[:, None])(rotate(h, th[:, None]))
    torch.testing.assert_close(cond.modulate(h, [th, b, psi]), expected)
    assert cond.widths(8) == [4, 8, 1]
