"""Gaussian diffusion with learned variance, written from the equations of DDPM (Ho et al. 2020) and
improved DDPM (Nichol & Dhariwal 2021): ε-prediction, Σ interpolated between β_t and β̃_t, the loss
L_simple + L_vlb, respaced DDPM and DDIM sampling, and classifier-free guidance on ε. DPM-Solver++(2M)
(Lu et al. 2022), deterministic and as its SDE variant, is diffusers' `DPMSolverMultistepScheduler`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from lit_mpdit.dit import linear_alphas_cumprod
from lit_mpdit.errors import ConfigError, check_choice

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, y) → output
SAMPLERS = ("ddpm", "ddim", "dpm++2m", "sde-dpm++2m")
MULTISTEP = {"dpm++2m": "dpmsolver++", "sde-dpm++2m": "sde-dpmsolver++"}  # diffusers' algorithm_type


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log p(x) for data on 256 bins in [-1, 1] under N(mean, std²), the edge bins open (DDPM Eq. 13)."""
    inv_std = torch.exp(-log_std)
    upper = torch.special.ndtr(inv_std * (x - mean + 1 / 255))
    lower = torch.special.ndtr(inv_std * (x - mean - 1 / 255))
    log_upper = torch.log(upper.clamp(min=1e-12))  # the lowest bin: everything below its upper edge
    log_one_minus_lower = torch.log((1 - lower).clamp(min=1e-12))  # the highest bin
    log_mid = torch.log((upper - lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_upper, torch.where(x > 0.999, log_one_minus_lower, log_mid))


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """`count` steps evenly spread over [0, T − 1], both ends included."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"sampling steps must be in [1, {num_timesteps}], got {count}")
    return sorted({round(x) for x in np.linspace(0, num_timesteps - 1, count)})


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """A diffusion over a subset of the T base steps (all of them for training).

    With a subset t_0 < … < t_{K−1}, the process is re-derived from ᾱ at those steps:
    β_k = 1 − ᾱ_{t_k} / ᾱ_{t_{k−1}} (improved DDPM Sec. 4). The denoiser always sees base steps t_k.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,  # T of the base linear-β schedule
        timesteps: Sequence[int] | None = None,  # the base steps kept; None = all T
        learn_sigma: bool = True,  # the denoiser also outputs v ∈ [-1, 1] per channel
    ):
        self.num_timesteps = num_timesteps
        self.learn_sigma = learn_sigma
        base = linear_alphas_cumprod(num_timesteps)
        kept = np.arange(num_timesteps) if timesteps is None else np.asarray(sorted(timesteps))
        abar = base[kept]
        abar_prev = np.append(1.0, abar[:-1])
        betas = 1 - abar / abar_prev
        post_var = betas * (1 - abar_prev) / (1 - abar)  # β̃ (DDPM Eq. 7)
        floor = post_var[1] if len(post_var) > 1 else betas[0]  # β̃_0 = 0: clip to β̃_1 (to β_0 for a one-step schedule)
        post_log_var = np.log(np.append(floor, post_var[1:]))
        tables = {
            "timestep_map": kept,
            "abar": abar,
            "abar_prev": abar_prev,
            "log_betas": np.log(betas),
            "post_log_var": post_log_var,
            "post_coef_x0": betas * np.sqrt(abar_prev) / (1 - abar),  # μ̃ = c_x0·x_0 + c_xt·x_t (DDPM Eq. 7)
            "post_coef_xt": (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar),
        }
        self._tables = {k: torch.from_numpy(np.asarray(v)) for k, v in tables.items()}
        self._on: dict[tuple, dict[str, torch.Tensor]] = {}

    @property
    def num_steps(self) -> int:
        return len(self._tables["abar"])

    def respaced(self, steps: int) -> GaussianDiffusion:
        return GaussianDiffusion(self.num_timesteps, space_timesteps(self.num_timesteps, steps), self.learn_sigma)

    def _at(self, name: str, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at step indices k (N,), shaped to broadcast against `like` (N, ...)."""
        key = (like.device, like.dtype)
        if key not in self._on:  # convert each table once per device and dtype, not per step
            self._on[key] = {n: (t.to(like.device) if n == "timestep_map" else t.to(like.device, like.dtype)) for n, t in self._tables.items()}
        out = self._on[key][name][k]
        return out.view(-1, *([1] * (like.ndim - 1))) if name != "timestep_map" else out

    def most_steps(self, sampler: str) -> int:
        """The most sampling steps `sampler` takes over the base schedule: all T, one fewer for diffusers' solvers
        (at T steps their spacing's step falls below 1: a repeated t, a zero-length step, NaN)."""
        return self.num_timesteps - (sampler in MULTISTEP)

    def multistep_solver(self, clip_x0: bool, sampler: str = "dpm++2m"):
        """diffusers' DPM-Solver++(2M) (or its SDE variant) in as many steps as this diffusion keeps, on the
        base T's β and in diffusers' own step spacing (999 … T/K, then to σ = 0: a second-order step onto t = 0
        itself, where λ jumps, lands far off). `thresholding` with `sample_max_value` 1 clamps x_0 to [-1, 1]:
        its quantile scale is clamped to [1, 1]."""
        try:
            from diffusers import DPMSolverMultistepScheduler
        except ImportError:
            raise ConfigError(f"--sampler {sampler}: needs diffusers (pip install 'lit_mpdit[latents]')") from None
        if self.num_steps > self.most_steps(sampler):
            raise ConfigError(f"--steps: {sampler} takes at most {self.most_steps(sampler)} steps, got {self.num_steps}")
        base = linear_alphas_cumprod(self.num_timesteps)
        solver = DPMSolverMultistepScheduler(
            num_train_timesteps=self.num_timesteps,
            trained_betas=1 - base / np.append(1.0, base[:-1]),
            solver_order=2,
            algorithm_type=MULTISTEP[sampler],
            thresholding=clip_x0,
            sample_max_value=1.0,
        )
        solver.set_timesteps(self.num_steps)
        return solver

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM Eq. 4)."""
        abar = self._at("abar", k, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self._at("post_coef_x0", k, xt) * x0 + self._at("post_coef_xt", k, xt) * xt
        return mean, self._at("post_log_var", k, xt).expand_as(xt)

    # ------------------------------------------------------------------ reverse process

    def split_output(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return out.chunk(2, dim=1) if self.learn_sigma else (out, None)

    def predict_x0(self, xt: torch.Tensor, k: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        abar = self._at("abar", k, xt)
        return (xt - (1 - abar).sqrt() * eps) / abar.sqrt()

    def p_mean_variance(self, xt, k, eps, v, clip_x0: bool = False) -> dict[str, torch.Tensor]:
        """p(x_{t−1} | x_t): mean through the predicted x_0; log Σ = frac·log β + (1 − frac)·log β̃ (iDDPM Eq. 15)."""
        if v is None:
            log_var = self._at("post_log_var", k, xt).expand_as(xt)
        else:
            frac = (v + 1) / 2
            log_var = frac * self._at("log_betas", k, xt) + (1 - frac) * self._at("post_log_var", k, xt)
        x0 = self.predict_x0(xt, k, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, xt, k)
        return {"mean": mean, "log_var": log_var, "x0": x0}

    def training_losses(self, model: Denoiser, x0: torch.Tensor, k: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """L_simple + L_vlb per example (iDDPM Eq. 16); the VLB sees the mean through a stopped ε."""
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, k, noise)
        eps, v = self.split_output(model(xt, self._at("timestep_map", k, xt), y))
        mse = mean_flat((noise - eps.float()) ** 2)
        if v is None:
            return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
        p = self.p_mean_variance(xt, k, eps.detach().float(), v.float())
        true_mean, true_log_var = self.q_posterior(x0, xt, k)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_var"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_var"])) / math.log(2.0)
        vb = torch.where(k == 0, nll, kl)  # bits per dimension
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def guided_output(self, model: Denoiser, xt, t, y, guidance: float, null_class: int):
        """ε (and v) at base steps t with classifier-free guidance: ε_u + s(ε_c − ε_u) on ε only; v from the
        conditional half."""
        if guidance == 1.0:
            return self.split_output(model(xt, t, y))
        out = model(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        eps, v = self.split_output(out)
        eps_c, eps_u = eps.chunk(2)
        return eps_u + guidance * (eps_c - eps_u), (None if v is None else v.chunk(2)[0])

    @torch.no_grad()
    def sample(
        self,
        model: Denoiser,
        noise: torch.Tensor,  # x_T, (N, C, H, W)
        y: torch.Tensor,  # labels (N,)
        *,
        sampler: str = "ddpm",  # "ddpm" (ancestral, learned Σ), "ddim" (η = 0), "dpm++2m" or "sde-dpm++2m" (diffusers)
        guidance: float = 1.0,  # classifier-free guidance scale; 1 = none
        null_class: int | None = None,  # the label index of "no class"; needed when guidance ≠ 1
        clip_x0: bool = False,  # clamp predicted x_0 to [-1, 1] (pixels; not latents)
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        check_choice("sampler", sampler, SAMPLERS)
        if guidance != 1.0 and null_class is None:
            raise ValueError("classifier-free guidance needs the null class index")
        x = noise
        if sampler in MULTISTEP:
            solver = self.multistep_solver(clip_x0, sampler)
            for t in solver.timesteps:
                eps, _ = self.guided_output(model, x, t.expand(len(x)).to(x.device), y, guidance, null_class)
                x = solver.step(eps.float(), t, x, generator=generator).prev_sample
            return x
        for i in reversed(range(self.num_steps)):
            k = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            eps, v = self.guided_output(model, x, self._at("timestep_map", k, x), y, guidance, null_class)
            eps, v = eps.float(), (None if v is None else v.float())
            if sampler == "ddpm":
                p = self.p_mean_variance(x, k, eps, v, clip_x0)
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if i > 0 else 0.0
                x = p["mean"] + torch.exp(0.5 * p["log_var"]) * z
            else:
                x0 = self.predict_x0(x, k, eps)
                if clip_x0:
                    x0 = x0.clamp(-1, 1)
                abar, abar_prev = self._at("abar", k, x), self._at("abar_prev", k, x)
                eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()  # ε consistent with the (clipped) x_0
                x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps  # DDIM Eq. 12, η = 0
        return x
