"""Magnitude-preserving primitives keep unit-variance inputs at unit variance."""
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from lit_mpdit.nn.mp import MPEmbedding, MPFourier, MPLinear, mp_silu, mp_sincos_table_2d, mp_sum, normalize


def rms(x: torch.Tensor) -> float:
    return x.float().square().mean().sqrt().item()


@settings(deadline=None, max_examples=25)
@given(rows=st.integers(1, 16), cols=st.integers(1, 64), scale=st.floats(1e-2, 1e3), seed=st.integers(0, 999))
def test_normalize_gives_unit_rms_rows(rows, cols, scale, seed):
    w = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale
    before = w.square().mean(dim=1).sqrt()
    after = normalize(w, eps=1e-4).square().mean(dim=1).sqrt()
    # Unit RMS up to the ε that guards against zero rows, RMS/(RMS + ε), and float32 accumulation.
    assert ((after - 1).abs() <= 1e-4 / before + 1e-6).all()


def test_mp_linear_preserves_unit_variance():
    torch.manual_seed(0)
    layer = MPLinear(512, 256)
    x = torch.randn(4096, 512)
    assert abs(rms(layer(x)) - 1) < 0.03


def test_forced_weight_normalization_rewrites_stored_weight_only_while_training():
    layer = MPLinear(8, 4)
    with torch.no_grad():
        layer.weight.mul_(10)
    layer.eval()
    layer(torch.randn(2, 8))
    assert rms(layer.weight) > 5  # evaluation leaves the stored weight alone
    layer.train()
    layer(torch.randn(2, 8))
    torch.testing.assert_close(layer.weight.square().mean(dim=1), torch.ones(4), rtol=1e-3, atol=1e-3)


def test_eval_cache_follows_weight_updates():
    layer = MPLinear(8, 4).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = layer(x)
        layer.weight.copy_(torch.randn(4, 8))  # e.g. an EMA swap or load_state_dict
        after = layer(x)
        expected = x @ (normalize(layer.weight) / math.sqrt(8)).T
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected)


def test_zero_gain_starts_at_zero_and_learns():
    layer = MPLinear(8, 4, gain="zero")
    out = layer(torch.randn(3, 8))
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert layer.gain.grad is not None and torch.count_nonzero(layer.gain.grad) > 0


def test_mp_silu_has_unit_rms_for_unit_normal_input():
    torch.manual_seed(0)
    assert abs(rms(mp_silu(torch.randn(1_000_000))) - 1) < 0.01


@settings(deadline=None, max_examples=25)
@given(t=st.floats(0.0, 1.0))
def test_mp_sum_preserves_unit_variance(t):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    assert abs(rms(mp_sum(a, b, t)) - 1) < 0.02


def test_fourier_features_have_unit_variance():
    torch.manual_seed(0)
    features = MPFourier(256)(torch.linspace(-2, 2, 512))
    assert abs(rms(features) - 1) < 0.05


def test_mp_positional_table_is_centred_with_unit_rms():
    table = torch.from_numpy(mp_sincos_table_2d(7, 192))
    assert abs(rms(table) - 1) < 1e-6
    assert table.mean(dim=0).abs().max() < 1e-9


def test_mp_embedding_rows_have_unit_rms():
    emb = MPEmbedding(11, 64)
    out = emb(torch.arange(11))
    torch.testing.assert_close(out.square().mean(dim=1), torch.ones(11), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("rows", [(5,), (40,), (2, 20)])  # below fan-in the outputs are scaled, else the weights
@pytest.mark.parametrize("gain", ["one", "zero", "learned"])
def test_fused_weight_normalization_matches_autograd_through_normalize(gain, rows):
    torch.manual_seed(0)
    layer = MPLinear(16, 8, gain=gain, forced=False).double()
    if layer.gain is not None:
        layer.gain.data.fill_(0.7)  # a zero gain would hide the weight's gradient
    layer.weight.data.mul_(torch.rand(8, 1, dtype=torch.float64) * 3)  # rows of unequal norm
    x = torch.randn(*rows, 16, dtype=torch.float64)
    w = layer.weight  # Eq. 66 written out in float64 (normalize() takes its RMS in float32)
    reference = w / (w.square().mean(dim=1, keepdim=True).sqrt() + 1e-4) / 4 * (1 if layer.gain is None else layer.gain)
    torch.testing.assert_close(layer.effective_weight(), reference)
    params = [layer.weight] + ([layer.gain] if layer.gain is not None else [])
    fused = torch.autograd.grad(layer(x).sin().sum(), params)
    expected = torch.autograd.grad((x @ reference.T).sin().sum(), params)
    assert torch.allclose(layer(x), x @ reference.T)
    for a, b in zip(fused, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gain", ["one", "learned"])
@pytest.mark.parametrize("rows", [(3,), (40,)], ids=["output-side", "weight-side"])  # below and above fan-in² elements
def test_forced_weight_normalization_gradient_is_autograds_through_normalize(gain, rows):
    torch.manual_seed(1)
    layer = MPLinear(16, 8, gain=gain, forced=True).double()
    if layer.gain is not None:
        layer.gain.data.fill_(0.7)
    layer.weight.data.mul_(torch.rand(8, 1, dtype=torch.float64) * 3 + 0.5)  # rows of unequal norm, rewritten below
    x = torch.randn(*rows, 16, dtype=torch.float64)
    params = [layer.weight] + ([layer.gain] if layer.gain is not None else [])
    fused = torch.autograd.grad(layer(x).sin().sum(), params)  # rewrites the stored rows first (Eq. 67)
    torch.testing.assert_close(layer.weight.square().mean(dim=1), torch.ones(8, dtype=torch.float64), rtol=1e-3, atol=1e-3)
    w = layer.weight  # EDM2's forced normalization: the rewritten weight, then Eq. 66 differentiated through
    reference = w / (w.square().mean(dim=1, keepdim=True).sqrt() + 1e-4) / 4 * (1 if layer.gain is None else layer.gain)
    expected = torch.autograd.grad((x @ reference.T).sin().sum(), params)
    for a, b in zip(fused, expected):
        torch.testing.assert_close(a, b)
