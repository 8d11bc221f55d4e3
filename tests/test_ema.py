"""EDM2's power-function EMA: σ_rel ↔ γ, the tracked recursion, post-hoc reconstruction, the callback."""
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_mpdit.ema import (
    GAMMA_AT_SIGMA_REL_MAX,
    SIGMA_REL_MAX,
    PowerEMA,
    gamma_to_sigma_rel,
    load_posthoc_ema,
    posthoc_coefficients,
    power_ema_beta,
    profile_residual,
    read_snapshots,
    reconstruct,
    sigma_rel_to_gamma,
)
from lit_mpdit.errors import ConfigError

# ----------------------------------------------------------------------------
# σ_rel ↔ γ.


@pytest.mark.parametrize("sigma_rel", [1e-4, 0.01, 0.05, 0.1, 0.2, 0.29, SIGMA_REL_MAX * (1 - 1e-9)])
def test_sigma_rel_gamma_round_trip_on_the_larger_branch(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-9)
    assert gamma >= GAMMA_AT_SIGMA_REL_MAX - 1e-4
    # σ² (γ+2)² (γ+3) = γ + 1 expands to γ³ + 7γ² + (16 − σ⁻²) γ + (12 − σ⁻²) = 0; take its largest root.
    s = sigma_rel**-2
    assert gamma == pytest.approx(np.roots([1, 7, 16 - s, 12 - s]).real.max(), rel=1e-6, abs=1e-6)


def test_gamma_of_edm2_widths():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)


def test_sigma_rel_is_largest_where_gamma_squared_plus_three_gamma_plus_one_vanishes():
    grid = np.linspace(-0.99, 50, 200001)
    widths = [gamma_to_sigma_rel(g) for g in grid]
    assert max(widths) <= SIGMA_REL_MAX + 1e-15
    assert grid[int(np.argmax(widths))] == pytest.approx(GAMMA_AT_SIGMA_REL_MAX, abs=1e-3)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.05, 0.31, 1.0, math.nan])
def test_sigma_rel_outside_the_open_range_is_a_config_error(sigma_rel):
    with pytest.raises(ConfigError, match=r"sigma_rel.*open range \(0, 0\.3003\)"):
        sigma_rel_to_gamma(sigma_rel)


def test_gamma_at_or_below_minus_one_is_a_config_error():
    with pytest.raises(ConfigError, match="gamma"):
        gamma_to_sigma_rel(-1.0)


# ----------------------------------------------------------------------------
# The tracked recursion.


def direct_power_ema(trajectory: torch.Tensor, gamma: float, t: int) -> torch.Tensor:
    """Σ_k w_k θ_k over k = 1..t with w_k = (k/t)^(γ+1) − ((k−1)/t)^(γ+1).

    Unrolling θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t with β_j = ((j−1)/j)^(γ+1) gives θ_k the weight
    (1 − β_k) Π_{j=k+1..t} β_j; the product telescopes to (k/t)^(γ+1), and (1 − β_k) (k/t)^(γ+1) is w_k.
    β_1 = 0, so the start value never matters; the weights telescope to 1.
    """
    k = torch.arange(1, t + 1, dtype=torch.float64)
    w = (k / t) ** (gamma + 1) - ((k - 1) / t) ** (gamma + 1)
    return (w[:, None] * trajectory[:t].double()).sum(0)


def toy_trajectory(steps: int = 60, dim: int = 8) -> torch.Tensor:
    """A drifting random walk θ_1..θ_T, with a sinusoid so that early and late weights differ a lot."""
    g = torch.Generator().manual_seed(0)
    k = torch.arange(1, steps + 1, dtype=torch.float64)[:, None]
    return torch.randn(steps, dim, generator=g, dtype=torch.float64).cumsum(0) * 0.1 + torch.sin(k / 7)


def drive(callback: PowerEMA, trajectory: torch.Tensor) -> nn.Module:
    """Feed θ_1..θ_T to the callback as if each were the weights after one optimizer step."""
    module = nn.Module()
    module.theta = nn.Parameter(trajectory[0].float().clone())
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    callback.setup(trainer, module, "fit")
    callback.on_train_start(trainer, module)
    for step, theta in enumerate(trajectory, start=1):
        module.theta.data.copy_(theta)
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, step - 1)
    return module


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.25])
def test_recursion_with_power_ema_beta_equals_the_direct_weighted_average(sigma_rel):
    gamma, theta = sigma_rel_to_gamma(sigma_rel), toy_trajectory()
    ema = torch.full_like(theta[0], 123.0)  # any start: β_1 = 0 replaces it
    for t in range(1, len(theta) + 1):
        beta = power_ema_beta(t, gamma)
        ema = beta * ema + (1 - beta) * theta[t - 1]
        torch.testing.assert_close(ema, direct_power_ema(theta, gamma, t), rtol=1e-12, atol=1e-12)


def test_callback_tracks_the_direct_power_ema(tmp_path):
    theta = toy_trajectory()
    callback = PowerEMA(snapshot_every=10, snapshot_dir=str(tmp_path))
    drive(callback, theta)
    for gamma, ema in zip(callback.gammas, callback.emas):
        assert not isinstance(ema["theta"], nn.Parameter) and not ema["theta"].requires_grad
        assert ema["theta"].dtype == torch.float32
        torch.testing.assert_close(ema["theta"].double(), direct_power_ema(theta, gamma, len(theta)), rtol=1e-5, atol=1e-6)


def test_start_step_delays_the_average(tmp_path):
    theta = toy_trajectory()
    callback = PowerEMA(snapshot_every=10, snapshot_dir=str(tmp_path), start_step=15)
    drive(callback, theta)
    expected = direct_power_ema(theta[15:], callback.gammas[0], len(theta) - 15)
    torch.testing.assert_close(callback.emas[0]["theta"].double(), expected, rtol=1e-5, atol=1e-6)
    assert [s["t"] for s in read_snapshots(tmp_path)][::2] == [5, 15, 25, 35, 45]


def test_tied_parameters_get_their_ema_under_every_name(tmp_path):
    module = nn.Module()
    module.a, module.b = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    module.b.weight = module.a.weight
    callback = PowerEMA(snapshot_every=2, snapshot_dir=str(tmp_path))
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    callback.setup(trainer, module, "fit")
    callback.on_train_start(trainer, module)
    for step in (1, 2):
        module.a.weight.data.add_(1.0)
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, step - 1)
    state = load_posthoc_ema(tmp_path, 0.05)
    assert state.keys() == {"a.weight", "b.weight"}
    torch.testing.assert_close(state["b.weight"], callback.emas[0]["a.weight"])
    torch.testing.assert_close(state["a.weight"], callback.emas[0]["a.weight"])


# ----------------------------------------------------------------------------
# Post-hoc reconstruction.


def edm2_snapshots(every: int, last: int) -> tuple[list[float], list[float]]:
    """EMA ages and exponents of snapshots of the two EDM2 EMAs taken every `every` steps up to `last`."""
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    steps = [float(t) for t in range(every, last + 1, every) for _ in gammas]
    return steps, gammas * (len(steps) // 2)


@pytest.mark.parametrize("unit_sum", [True, False])
@pytest.mark.parametrize(("every", "last"), [(10, 30), (1000, 400_000)])  # the paper's 400K steps
@pytest.mark.parametrize("which", [0, 1])
def test_reconstruction_at_a_tracked_width_returns_that_snapshot(unit_sum, every, last, which):
    steps, gammas = edm2_snapshots(every, last)
    index = len(steps) - 2 + which  # the last snapshot of the tracked EMA
    x = posthoc_coefficients(steps, gammas, last, gammas[index], unit_sum=unit_sum)
    expected = torch.zeros(len(steps), dtype=torch.float64)
    expected[index] = 1
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-8)
    assert profile_residual(steps, gammas, last, gammas[index], x) < 1e-6


def discretised_profiles(steps, gammas, target_step, target_gamma, cells: int = 60000):
    """Profiles p_{γ,t}(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t] at midpoints of a fine grid, scaled by √dτ."""
    tau = (np.arange(cells) + 0.5) * (target_step / cells)
    root_dtau = math.sqrt(target_step / cells)

    def profile(t, gamma):
        return np.where(tau <= t, (gamma + 1) * tau**gamma / t ** (gamma + 1), 0.0) * root_dtau

    return np.stack([profile(t, g) for t, g in zip(steps, gammas)], axis=1), profile(target_step, target_gamma)


@pytest.mark.parametrize("sigma_rel", [0.03, 0.07, 0.15])
def test_coefficients_match_a_discretised_least_squares(sigma_rel):
    steps, gammas = edm2_snapshots(10, 30)
    gamma = sigma_rel_to_gamma(sigma_rel)
    a, y = discretised_profiles(steps, gammas, 30, gamma)
    free = np.linalg.lstsq(a, y, rcond=None)[0]
    # Σ x = 1 by elimination: x = e_last + N z, the columns of N spanning {Σ x = 0}.
    n = len(steps)
    base, null = np.eye(n)[-1], np.eye(n)[:, :-1] - np.eye(n)[:, -1:]
    constrained = base + null @ np.linalg.lstsq(a @ null, y - a @ base, rcond=None)[0]
    for unit_sum, expected in [(False, free), (True, constrained)]:
        x = posthoc_coefficients(steps, gammas, 30, gamma, unit_sum=unit_sum)
        np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=2e-4)
        residual = np.linalg.norm(a @ expected - y) / np.linalg.norm(y)
        assert profile_residual(steps, gammas, 30, gamma, x) == pytest.approx(residual, rel=1e-3, abs=1e-5)
    assert posthoc_coefficients(steps, gammas, 30, gamma).sum().item() == pytest.approx(1, abs=1e-12)


def test_reconstruct_is_the_weighted_sum_in_each_dtype():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([3.0, -1.0]), "h": torch.tensor([3.0], dtype=torch.bfloat16)}
    out = reconstruct([a, b], [0.25, 0.75])
    torch.testing.assert_close(out["w"], torch.tensor([2.5, -0.25]))
    assert out["h"].dtype == torch.bfloat16 and out["h"].item() == 2.5


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
def test_load_posthoc_ema_at_a_tracked_width_is_that_ema(tmp_path, sigma_rel):
    callback = PowerEMA(snapshot_every=10, snapshot_dir=str(tmp_path))
    drive(callback, toy_trajectory())
    state = load_posthoc_ema(tmp_path, sigma_rel)
    torch.testing.assert_close(state["theta"], callback.emas[callback.sigma_rels.index(sigma_rel)]["theta"])


@pytest.mark.parametrize("sigma_rel", [0.03, 0.07, 0.15])
def test_load_posthoc_ema_approximates_the_true_power_ema(tmp_path, sigma_rel):
    theta = toy_trajectory()
    callback = PowerEMA(snapshot_every=10, snapshot_dir=str(tmp_path))
    drive(callback, theta)
    got = load_posthoc_ema(tmp_path, sigma_rel)["theta"].double()
    truth = direct_power_ema(theta, sigma_rel_to_gamma(sigma_rel), len(theta))
    # Snapshots are exact power EMAs of the piecewise-constant trajectory, so Cauchy–Schwarz bounds the
    # error by the profile residual times ‖θ‖ over τ ∈ [0, T], i.e. √(Σ_k θ_k²) with unit-length steps.
    snapshots = read_snapshots(tmp_path)
    steps, gammas = [s["t"] for s in snapshots], [s["gamma"] for s in snapshots]
    target = sigma_rel_to_gamma(sigma_rel)
    residual = profile_residual(steps, gammas, 60, target, posthoc_coefficients(steps, gammas, 60, target))
    p_norm = (target + 1) / math.sqrt((2 * target + 1) * 60)  # ‖p_target‖ = (γ+1) / √((2γ+1) T)
    bound = residual * p_norm * theta.square().sum(0).sqrt() + 1e-5
    assert ((got - truth).abs() <= bound).all()
    spread = theta.max(0).values - theta.min(0).values
    assert ((got - truth).abs() / spread).max() < 0.02


def test_load_posthoc_ema_step_selects_an_earlier_snapshot(tmp_path):
    theta = toy_trajectory()
    callback = PowerEMA(snapshot_every=10, snapshot_dir=str(tmp_path))
    drive(callback, theta)
    got = load_posthoc_ema(tmp_path, 0.10, step=29)["theta"].double()  # the snapshot at step 20
    torch.testing.assert_close(got, direct_power_ema(theta, sigma_rel_to_gamma(0.10), 20), rtol=1e-5, atol=1e-6)


def test_load_posthoc_ema_without_snapshots_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no EMA snapshots"):
        load_posthoc_ema(tmp_path, 0.05)
    drive(PowerEMA(snapshot_every=10, snapshot_dir=str(tmp_path)), toy_trajectory(20))
    with pytest.raises(ConfigError, match="at or before step 9"):
        load_posthoc_ema(tmp_path, 0.05, step=9)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"sigma_rels": ()}, "sigma_rels"),
        ({"sigma_rels": (0.05, 0.05)}, "sigma_rels"),
        ({"sigma_rels": (0.05, 0.4)}, "sigma_rel"),
        ({"snapshot_every": 0}, "snapshot_every"),
        ({"start_step": -1}, "start_step"),
    ],
)
def test_bad_callback_options_are_config_errors(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        PowerEMA(**kwargs)


# ----------------------------------------------------------------------------
# The callback in real fits.


class TinyMLP(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(root: Path, max_steps: int, *callbacks: L.Callback, ckpt_path: str | None = None, **kwargs) -> tuple:
    torch.manual_seed(0)
    module = TinyMLP()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, 4, generator=g), torch.randn(40, 1, generator=g))  # 10 batches an epoch
    trainer = L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module, DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return trainer, module


def test_fit_writes_snapshots_that_load_into_the_module(tmp_path):
    callback = PowerEMA(snapshot_every=10)
    _, module = fit(tmp_path, 30, callback)
    snapshots = read_snapshots(tmp_path / "ema_snapshots")
    assert [(s["step"], s["sigma_rel"]) for s in snapshots] == [(t, w) for t in (10, 20, 30) for w in (0.10, 0.05)]
    assert [s["t"] for s in snapshots] == [s["step"] for s in snapshots]
    assert len(list((tmp_path / "ema_snapshots").iterdir())) == 6  # no temporary files left
    params = dict(module.named_parameters())
    for ema in callback.emas:
        assert ema.keys() == params.keys()

    state = load_posthoc_ema(tmp_path / "ema_snapshots", 0.05)
    for name, ema in callback.emas[0].items():
        torch.testing.assert_close(state[name], ema)
    for name, buffer in module.named_buffers():  # taken from the live model at the last snapshot
        torch.testing.assert_close(state[name], buffer)

    live = {k: v.clone() for k, v in module.state_dict().items()}
    result = module.load_state_dict(load_posthoc_ema(tmp_path / "ema_snapshots", 0.07), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert not torch.equal(module.net[0].weight, live["net.0.weight"])
    torch.testing.assert_close(module.net[1].running_mean, live["net.1.running_mean"])


def test_fit_snapshots_its_last_step_and_counts_optimizer_steps(tmp_path):
    callback = PowerEMA(snapshot_every=10, snapshot_dir=str(tmp_path / "snaps"))
    fit(tmp_path, 25, callback, accumulate_grad_batches=2)
    assert callback.step == 25
    assert sorted({s["step"] for s in read_snapshots(tmp_path / "snaps")}) == [10, 20, 25]


def test_state_dict_round_trip(tmp_path):
    callback = PowerEMA(snapshot_every=10)
    fit(tmp_path, 12, callback)
    path = tmp_path / "state.pt"
    torch.save(callback.state_dict(), path)
    restored = PowerEMA(snapshot_every=10)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.step == callback.step == 12
    for ours, theirs in zip(callback.emas, restored.emas):
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name])
            assert ours[name].data_ptr() != theirs[name].data_ptr()


def test_resume_from_a_checkpoint_continues_the_emas_exactly(tmp_path):
    straight = PowerEMA(snapshot_every=10)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    fit(tmp_path / "straight", 30, straight, checkpoints)
    step20 = next((tmp_path / "ckpt").glob("*step=20.ckpt"))

    resumed = PowerEMA(snapshot_every=10)
    fit(tmp_path / "resumed", 30, resumed, ckpt_path=str(step20))

    assert resumed.step == straight.step == 30
    for ours, theirs in zip(straight.emas, resumed.emas):
        for name in ours:
            torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=0)
    a, b = (read_snapshots(tmp_path / run / "ema_snapshots") for run in ("straight", "resumed"))
    assert [s["step"] for s in b] == [30, 30]
    for ours, theirs in zip(a[-2:], b):
        for name, value in ours["state_dict"].items():
            assert torch.equal(theirs["state_dict"][name], value)
