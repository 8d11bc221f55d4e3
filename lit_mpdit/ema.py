"""EDM2's power-function EMA with post-hoc reconstruction (Karras et al. 2024, arXiv 2312.02696, Sec. 3, App. C).

A power-function EMA of exponent γ averages the training trajectory θ(τ) with the profile

    p_{γ,t}(τ) = (γ + 1) τ^γ / t^(γ+1)  on 0 ≤ τ ≤ t,  0 after t          (App. C, Eq. 121)

whose relative standard deviation σ_rel depends on γ alone (Eq. 123). With the per-step decay
β_t = (1 − 1/t)^(γ+1) (Eq. 127, one step per unit of time) the recursion θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t
gives θ_k the weight Π_{j>k} β_j · (1 − β_k) = (k/t)^(γ+1) − ((k−1)/t)^(γ+1), which is exactly the
integral of p_{γ,t} over (k − 1, k]: the tracked average *is* the continuous power EMA of the
piecewise-constant trajectory, from the first step on (β_1 = 0). Profiles therefore describe the
snapshots exactly, and a combination Σ x_i θ̂_i of snapshots is the average of the trajectory under the
profile Σ x_i p_i. Post-hoc reconstruction picks the x whose profile is closest, in L2, to the profile
of the wanted σ_rel; the inner products of two profiles have a closed form (Eq. 151).

Times here count optimizer steps since the callback's `start_step` ("EMA age" t).

Why not `ema-pytorch`'s `PostHocEMA` (checked at 0.8.3 against this module and EDM2's reference code):
its default `update_every=100` applies the per-step decay (1 − 1/t)^(γ+1) only every 100th step without
scaling it by the interval, so the tracked averages are far wider than asked (σ_rel ≈ 0.24 and 0.18 for
0.05 and 0.10 over 20K steps) while reconstruction assumes the nominal γ; even updated every step, its
first update copies the weights and its β uses t + 1, so snapshot t is the EMA of age t + 1 with θ₁ twice.
Its least-squares solution is not rescaled to sum to one (EDM2's is), which with a dozen snapshots scales
every reconstructed weight by 1–2%. Its snapshots are float16 by default, the step counter included
(inexact past 2048), written non-atomically by every rank under names that record neither γ nor σ_rel,
and reconstruction needs a live model rather than a folder. Here the EMAs are float32 tensors held by the
callback and saved in Lightning checkpoints, the time axis is exact from step 1, snapshots are
self-describing float32 files written atomically on rank 0, and the reconstruction is the unit-sum
least-squares solution (tests/test_ema.py); on 200 tensors the update also ran 1.8× faster than the library's.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch

from lit_mpdit.runs import run_dir
from lit_mpdit.errors import ConfigError

# ----------------------------------------------------------------------------
# σ_rel and the exponent γ.

# σ_rel(γ) rises from 0 at γ = −1 to its maximum where d log σ_rel² / dγ = 0, i.e. γ² + 3γ + 1 = 0, then
# falls to 0 again; every σ_rel below the maximum has two exponents, and we take the larger (as EDM2).
GAMMA_AT_SIGMA_REL_MAX = (math.sqrt(5) - 3) / 2


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function profile of exponent γ > −1 (Eq. 123)."""
    if not gamma > -1:
        raise ConfigError(f"gamma: the power-function exponent must be > -1, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_AT_SIGMA_REL_MAX)  # ≈ 0.3003


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The larger exponent γ with σ_rel(γ) = sigma_rel (Eq. 126), in closed form.

    With u = γ + 2 and S = σ_rel⁻², Eq. 123 becomes the cubic u³ + u² − S u + S = 0. Below the maximum
    it has three real roots; Viète's trigonometric formula gives the largest, the branch γ ≥ (√5 − 3)/2.
    """
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(
            f"sigma_rel: must lie in the open range (0, {SIGMA_REL_MAX:.4f}) — the largest relative width a "
            f"power-function EMA can have — got {sigma_rel}"
        )
    s = sigma_rel**-2
    p = -s - 1 / 3  # depressed cubic v³ + p v + q = 0 with u = v − 1/3
    q = 2 / 27 + 4 * s / 3
    cos_3phi = max(-1.0, min(1.0, 3 * q / (2 * p) * math.sqrt(-3 / p)))  # clamp the rounding at σ_rel ≈ max
    v = 2 * math.sqrt(-p / 3) * math.cos(math.acos(cos_3phi) / 3)
    return v - 1 / 3 - 2


def power_ema_beta(t: int, gamma: float) -> float:
    """Decay at step t ≥ 1 of the power-function EMA: β_t = (1 − 1/t)^(γ+1) (Eq. 127 with Δt = 1)."""
    return (1 - 1 / t) ** (gamma + 1)


# ----------------------------------------------------------------------------
# Post-hoc reconstruction.


def profile_inner_products(
    t_a: torch.Tensor, gamma_a: torch.Tensor, t_b: torch.Tensor, gamma_b: torch.Tensor
) -> torch.Tensor:
    """⟨p_{γa,ta}, p_{γb,tb}⟩ = ∫₀^∞ p_a p_b dτ, broadcast over the inputs (App. C, Eq. 151).

    Both profiles are nonzero only up to t_min = min(t_a, t_b), so the integral is
    (γa+1)(γb+1) t_min^(γa+γb+1) / ((γa+γb+1) t_a^(γa+1) t_b^(γb+1)); dividing through by t_max gives
    (γa+1)(γb+1) / ((γa+γb+1) t_max) · (t_min / t_max)^γ_later, where γ_later belongs to the profile
    that ends at t_max. This form never raises a large t to a large power. It needs γa + γb > −1.
    """
    t_min, t_max = torch.minimum(t_a, t_b), torch.maximum(t_a, t_b)
    gamma_later = torch.where(t_a < t_b, gamma_b, gamma_a)
    scale = (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_max)
    return scale * (t_min / t_max) ** gamma_later


def _profiles(
    steps: Sequence[float], gammas: Sequence[float], target_step: float, target_gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gram matrix G_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_target⟩ and ⟨p_target, p_target⟩, in float64.

    Times are measured in units of target_step, which keeps every entry of order one.
    """
    t = torch.as_tensor(steps, dtype=torch.float64) / target_step
    g = torch.as_tensor(gammas, dtype=torch.float64)
    if t.ndim != 1 or t.shape != g.shape or len(t) == 0:
        raise ConfigError(f"snapshots: need one step per exponent and at least one, got {len(t)} and {len(g)}")
    if not (t > 0).all():
        raise ConfigError(f"snapshots: every snapshot step must be > 0, got {list(steps)}")
    if not (g > -0.5).all() or not target_gamma > -0.5:
        raise ConfigError("gamma: a profile is square-integrable only for an exponent > -1/2")
    one, gt = torch.ones((), dtype=torch.float64), torch.tensor(target_gamma, dtype=torch.float64)
    gram = profile_inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
    cross = profile_inner_products(t, g, one, gt)
    return gram, cross, profile_inner_products(one, gt, one, gt)


def posthoc_coefficients(
    steps: Sequence[float],  # t_i of each snapshot (EMA age in optimizer steps)
    gammas: Sequence[float],  # γ_i of each snapshot
    target_step: float,  # t of the wanted average
    target_gamma: float,  # γ of the wanted average
    unit_sum: bool = True,  # constrain Σ x_i = 1, so the result is itself a weighted average
) -> torch.Tensor:
    """Coefficients x (float64) minimising ‖Σ x_i p_i − p_target‖₂ over τ ≥ 0 (App. C, Algorithm 3).

    The normal equations are G x = b with the closed-form inner products of Eq. 151. Every profile
    has unit mass, so the mass of the combination is Σ x_i; with few snapshots the free optimum can
    miss 1 by tens of per cent and would shrink every parameter by as much. With `unit_sum` we solve
    the constrained problem through its KKT system [[G, 1], [1ᵀ, 0]] [x; λ] = [b; 1] (EDM2 instead
    rescales the free solution). A target profile that is one of the snapshots' is recovered exactly
    either way, since it has zero residual and unit mass. Solved by rank-revealing (column-pivoted QR)
    least squares, which stays well-behaved when many nearly collinear snapshots make G ill-conditioned.
    """
    gram, cross, _ = _profiles(steps, gammas, target_step, target_gamma)
    n = len(cross)
    if unit_sum:
        ones = torch.ones(n, 1, dtype=torch.float64)
        gram = torch.cat([torch.cat([gram, ones], 1), torch.cat([ones.T, torch.zeros(1, 1, dtype=torch.float64)], 1)])
        cross = torch.cat([cross, torch.ones(1, dtype=torch.float64)])
    solution = torch.linalg.lstsq(gram, cross[:, None], driver="gelsy").solution[:, 0]
    return solution[:n]


def profile_residual(
    steps: Sequence[float], gammas: Sequence[float], target_step: float, target_gamma: float, coefficients: torch.Tensor
) -> float:
    """Relative L2 error ‖Σ x_i p_i − p_target‖ / ‖p_target‖ of a reconstruction, from the same inner products.

    It bounds the error of the reconstructed weights: for any trajectory θ, by Cauchy–Schwarz,
    |Σ x_i θ̂_i − θ̂_target| ≤ ‖Σ x_i p_i − p_target‖ · ‖θ‖ (norms over τ).
    """
    gram, cross, target = _profiles(steps, gammas, target_step, target_gamma)
    x = coefficients.to(torch.float64)
    squared = target - 2 * x @ cross + x @ gram @ x
    return math.sqrt(max(squared.item(), 0.0) / target.item())


def reconstruct(snapshots: Sequence[Mapping[str, torch.Tensor]], coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ x_i · snapshot_i, key by key, accumulated in float64 and returned in each tensor's dtype."""
    if len(snapshots) != len(coefficients) or not snapshots:
        raise ConfigError(f"reconstruct: need one coefficient per snapshot, got {len(coefficients)} and {len(snapshots)}")
    result = {}
    for key, first in snapshots[0].items():
        total = torch.zeros(first.shape, dtype=torch.float64)
        for x, snapshot in zip(coefficients, snapshots):
            total += float(x) * snapshot[key].to(torch.float64)
        result[key] = total.to(first.dtype)
    return result


# ----------------------------------------------------------------------------
# Snapshot files.

SNAPSHOT_GLOB = "ema-*.pt"


def snapshot_path(snapshot_dir: Path, step: int, sigma_rel: float) -> Path:
    return snapshot_dir / f"ema-step{step:09d}-sigma{sigma_rel:.4f}.pt"


def read_snapshots(snapshot_dir: str | os.PathLike, step: int | None = None) -> list[dict]:
    """Every snapshot in the directory taken at or before `step` (default: all), sorted by step.

    Files are memory-mapped: tensors are read from disk only when used.
    """
    paths = sorted(Path(snapshot_dir).glob(SNAPSHOT_GLOB))
    snapshots = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in paths]
    snapshots = [s for s in snapshots if step is None or s["step"] <= step]
    return sorted(snapshots, key=lambda s: (s["step"], s["gamma"]))


def load_posthoc_ema(
    snapshot_dir: str | os.PathLike, sigma_rel: float, step: int | None = None, max_residual: float = 0.1
) -> dict[str, torch.Tensor]:
    """The power EMA of width `sigma_rel` at the last snapshot (at or before `step`), rebuilt post hoc.

    Returns a state dict for `load_state_dict(strict=False)` on the module the snapshots were taken
    from: reconstructed parameters, and buffers as they were at that snapshot. Warns when the
    snapshots cannot represent the wanted profile to within `max_residual` (relative L2 error).
    """
    gamma = sigma_rel_to_gamma(sigma_rel)
    snapshots = read_snapshots(snapshot_dir, step)
    if not snapshots:
        where = "" if step is None else f" at or before step {step}"
        raise ConfigError(f"snapshot_dir: no EMA snapshots ({SNAPSHOT_GLOB}) in {snapshot_dir}{where}")
    last = snapshots[-1]
    ts, gammas = [s["t"] for s in snapshots], [s["gamma"] for s in snapshots]
    coefficients = posthoc_coefficients(ts, gammas, last["t"], gamma)
    residual = profile_residual(ts, gammas, last["t"], gamma, coefficients)
    if residual > max_residual:
        warnings.warn(
            f"post-hoc EMA at sigma_rel={sigma_rel}: the {len(snapshots)} snapshots match the wanted profile only "
            f"to a relative L2 error of {residual:.2f}; take snapshots more often or track a closer sigma_rel"
        )
    parameters = reconstruct([s["state_dict"] for s in snapshots], coefficients.tolist())
    return {**last["buffers"], **parameters}


# ----------------------------------------------------------------------------
# The callback.


class PowerEMA(L.Callback):
    """Tracks EDM2's power-function EMAs of every parameter and writes snapshots for post-hoc reconstruction.

    Each tracked σ_rel keeps one float32 copy of the module's parameters (plain tensors on the module's
    device), updated after every optimizer step. Every `snapshot_every` steps, and at the end of
    training, each EMA is written to `snapshot_dir` with the module's buffers as they are then; rebuild
    any σ_rel afterwards with `load_posthoc_ema`. The running EMAs are part of the checkpoint, so a
    resumed run continues them exactly.
    """

    def __init__(
        self,
        sigma_rels: tuple[float, ...] = (0.05, 0.10),  # tracked EMA widths, as in EDM2
        snapshot_every: int = 1000,  # optimizer steps between snapshots
        snapshot_dir: str | None = None,  # None = <trainer.log_dir or default_root_dir>/ema_snapshots
        start_step: int = 0,  # optimizer step at which averaging starts (EMA age t = step − start_step)
    ):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ConfigError(f"sigma_rels: need one or more distinct values, got {sigma_rels}")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        if snapshot_every < 1:
            raise ConfigError(f"snapshot_every: must be a positive number of steps, got {snapshot_every}")
        if start_step < 0:
            raise ConfigError(f"start_step: must be >= 0, got {start_step}")
        self.snapshot_every, self.snapshot_dir, self.start_step = snapshot_every, snapshot_dir, start_step
        self.directory: Path | None = None  # snapshot_dir as resolved for the current trainer
        self.emas: list[dict[str, torch.Tensor]] | None = None  # one {name: tensor} per σ_rel
        self.step = -1  # the optimizer step the EMAs include
        self._last_snapshot = -1

    @property
    def state_key(self) -> str:
        # Naming the tracked widths: a checkpoint's EMAs only ever reach a callback tracking the same ones.
        return self._generate_state_key(sigma_rels=self.sigma_rels)

    def setup(self, trainer, pl_module, stage):
        self.directory = Path(self.snapshot_dir) if self.snapshot_dir else run_dir(trainer) / "ema_snapshots"

    @torch.no_grad()
    def on_train_start(self, trainer, pl_module):
        # Runs after any checkpoint (and so our state) has been restored, with the module on its device.
        device = next(pl_module.parameters()).device
        if self.emas is None:
            if trainer.global_step > self.start_step:
                warnings.warn(
                    f"PowerEMA starts at step {trainer.global_step} without saved state, after start_step="
                    f"{self.start_step}: the averages treat the current weights as the whole history"
                )
            self.emas = [{n: p.detach().float().clone() for n, p in pl_module.named_parameters()} for _ in self.gammas]
            self.step = trainer.global_step
        self.emas = [{n: e.to(device) for n, e in ema.items()} for ema in self.emas]

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:  # no optimizer step in this batch (gradient accumulation)
            return
        self.step = trainer.global_step
        t = self.step - self.start_step
        if t <= 0:
            return
        params = dict(pl_module.named_parameters())
        for gamma, ema in zip(self.gammas, self.emas):
            weight = 1 - power_ema_beta(t, gamma)
            for name, e in ema.items():
                e.lerp_(params[name].detach().float(), weight)
        if self.step % self.snapshot_every == 0:
            self.write_snapshots(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.step > self.start_step and self._last_snapshot != self.step:
            self.write_snapshots(trainer, pl_module)

    def write_snapshots(self, trainer, pl_module) -> None:
        """Write every EMA at the current step, atomically (a temporary file, then `os.replace`)."""
        self._last_snapshot = self.step
        if not trainer.is_global_zero:
            return
        # Tied parameters appear in the state dict under every name; give each name its EMA.
        canonical = {id(p): n for n, p in pl_module.named_parameters()}
        aliases = {n: canonical[id(p)] for n, p in pl_module.named_parameters(remove_duplicate=False)}
        buffers = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if k not in aliases}
        self.directory.mkdir(parents=True, exist_ok=True)
        for sigma_rel, gamma, ema in zip(self.sigma_rels, self.gammas, self.emas):
            snapshot = {
                "step": self.step,  # global optimizer step
                "t": self.step - self.start_step,  # EMA age, the time axis of the profiles
                "sigma_rel": sigma_rel,
                "gamma": gamma,
                "state_dict": {alias: ema[name].cpu() for alias, name in aliases.items()},
                "buffers": buffers,
            }
            path = snapshot_path(self.directory, self.step, sigma_rel)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(snapshot, tmp)
            os.replace(tmp, path)

    def state_dict(self) -> dict:
        return {"step": self.step, "emas": self.emas}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step = state_dict["step"]
        emas = state_dict["emas"]
        self.emas = None if emas is None else [{n: e.detach().float().clone() for n, e in ema.items()} for ema in emas]
