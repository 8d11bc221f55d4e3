"""FID-N of a trained model, stored with the protocol that produced it.

    python -m lit_mpdit evaluate --ckpt C [--n 1000 --steps 50 --sampler ddpm --guidance 1.5 --weights ema]

Every number leaves with its protocol: N generated and reference, the reference set, the sampler and
its steps, the guidance scale, the weights (EMA, current or post-hoc at σ_rel), the seed, the
Inception precision and preprocessing, and the training step of the weights. The command line of
`evaluate` lives in `lit_mpdit.cli` (`evaluate_main`): this module is the library it calls.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lit_mpdit.errors import ConfigError, check_choice, check_range

WEIGHT_CHOICES = ("ema", "current", "posthoc", "init")  # init: an untrained model, the baseline


@dataclass(frozen=True)
class Protocol:
    n_fake: int = 1000  # generated images, class-balanced
    n_ref: int = 5000  # reference images
    reference_split: str = "test"  # split of the data the reference images come from
    steps: int = 50  # sampling steps (respaced)
    sampler: str = "ddpm"  # ddpm, ddim, dpm++2m or sde-dpm++2m (diffusers)
    guidance: float = 1.5  # classifier-free guidance scale; 1 = none
    weights: str = "ema"  # ema, current, posthoc (EDM2 reconstruction at sigma_rel), or init (untrained)
    sigma_rel: float | None = None  # for posthoc
    seed: int = 0  # seeds the sampling noise and the bootstrap
    precision: str = "fp32"  # Inception precision: fp32, bf16, or auto (bf16 where it pays: runtime.bf16_pays)
    bootstrap: int = 200  # resamples for the 95% interval; 0 = none
    sample_precision: str = "fp32"  # the denoiser's precision while sampling: fp32, bf16 autocast (ε and x_t stay fp32), or auto
    compile: bool = False  # torch.compile the denoiser for sampling (`DiffusionModule.sample`)

    def __post_init__(self):
        from lit_mpdit.diffusion import SAMPLERS
        from lit_mpdit.metrics.fid import PRECISIONS
        from lit_mpdit.runtime import AUTO, resolve_precision

        check_choice("--sampler", self.sampler, SAMPLERS)
        check_choice("--weights", self.weights, WEIGHT_CHOICES)
        for field, option in (("precision", "--precision"), ("sample_precision", "--sample-precision")):
            check_choice(option, getattr(self, field), (*PRECISIONS, AUTO))
            object.__setattr__(self, field, resolve_precision(getattr(self, field), "bf16", "fp32"))  # frozen: set once, here
        check_range("--steps", self.steps, 1)
        check_range("--guidance", self.guidance, 0)
        check_range("--bootstrap", self.bootstrap, 0)
        if self.n_fake < 2 or self.n_ref < 2:
            raise ConfigError(f"--n / --n-ref: FID needs at least 2 images per set, got {self.n_fake} and {self.n_ref}")
        if self.weights == "posthoc" and self.sigma_rel is None:
            raise ConfigError("--sigma-rel: post-hoc EMA needs the σ_rel to reconstruct (the paper samples at 0.05)")


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """n labels cycling through the classes, so every class is drawn equally (±1)."""
    return torch.arange(n) % num_classes


def evaluate(
    module,  # a DiffusionModule carrying the weights to evaluate
    reference_name: str,  # identifies the reference images in the cache, e.g. "fashion_mnist:test"
    reference_images: Callable[[], torch.Tensor],  # uint8 (N, C, H, W), called only when the cache misses
    protocol: Protocol,
    to_images: Callable[[torch.Tensor], torch.Tensor] | None = None,  # samples → uint8 images; None = pixels in [-1, 1]
    subsets: tuple[int, ...] = (),  # also the FID of the first n generated images, for each n (balanced classes)
) -> dict:
    """Sample `n_fake` images, compare them with the reference by FID, bootstrap an interval. Latent models
    pass their data module's `to_images`, which decodes with the VAE. `subsets` gives a smaller-N FID from the
    same images for free (a convergence curve's last point, at the curve's N)."""
    from lit_mpdit.images import to_uint8
    from lit_mpdit.metrics.fid import InceptionFeatures, fid_from_features, reference_features
    from lit_mpdit.metrics.frechet import bootstrap_fid

    check_range("--steps", protocol.steps, 1, module.diffusion.most_steps(protocol.sampler))  # before minutes of reference features
    started = time.perf_counter()
    net = InceptionFeatures(protocol.precision)
    loaded = time.perf_counter()
    reference = reference_features(reference_name, reference_images, protocol.n_ref, net=net)
    referenced = time.perf_counter()  # a cache miss computes the features, once per machine: a one-time cost
    labels = balanced_labels(protocol.n_fake, module.hparams.num_classes)
    with torch.autocast(module.device.type, dtype=torch.bfloat16, enabled=protocol.sample_precision == "bf16"):
        samples = module.sample(labels, steps=protocol.steps, sampler=protocol.sampler, guidance=protocol.guidance, seed=protocol.seed, compile=protocol.compile)
    sampled = time.perf_counter()
    fake = net((to_images or to_uint8)(samples))
    fid = fid_from_features(reference, fake)
    lo, hi = bootstrap_fid(reference, fake, n_boot=protocol.bootstrap, seed=protocol.seed) if protocol.bootstrap else (float("nan"),) * 2
    return {
        "fid": fid,
        "fid_lo": lo,
        "fid_hi": hi,
        "fid_subsets": {n: fid_from_features(reference, fake[:n]) for n in subsets},
        "protocol": {
            **asdict(protocol),
            "n_fake": len(fake),
            "n_ref": len(reference),
            "reference": reference_name,
            # Which reference features, exactly: FIDs compare only when this agrees (a cache written by other code
            # or from other images under the same name shifts every FID alike).
            "reference_sha256": hashlib.sha256(reference.contiguous().numpy().tobytes()).hexdigest()[:16],
            "training_step": int(module.global_step) if module._trainer is not None else getattr(module, "trained_steps", 0),
            "interval": f"95% bootstrap over the generated set, {protocol.bootstrap} resamples" if protocol.bootstrap else "none",
            "inception": net.protocol,
        },
        "seconds": {"reference": referenced - loaded, "sampling": sampled - referenced, "total": time.perf_counter() - started},
    }


def load_for_evaluation(ckpt: str, protocol: Protocol, snapshots: str | None):
    """The module of `ckpt` with the weights the protocol names."""
    from lit_mpdit.module import load_module

    module = load_module(ckpt, "current" if protocol.weights == "posthoc" else protocol.weights)
    if protocol.weights == "posthoc":
        from lit_mpdit.ema import load_posthoc_ema

        directory = Path(snapshots) if snapshots else Path(ckpt).resolve().parents[1] / "ema_snapshots"
        state = load_posthoc_ema(directory, protocol.sigma_rel)
        missing, unexpected = module.load_state_dict(state, strict=False)
        if unexpected:
            raise ConfigError(f"--snapshots: {directory} holds parameters this model lacks: {unexpected[:3]}")
    return module


def generates_pixels(module) -> bool:
    """Whether a model's samples are images (grayscale or RGB) rather than latents for a VAE to decode."""
    return module.hparams.in_channels in (1, 3)


def checkpoint_datamodule(ckpt: str):
    """The data module a checkpoint was trained with, rebuilt from the class and arguments Lightning stored in it."""
    from lit_mpdit.data import instantiate_datamodule
    from lit_mpdit.module import read_checkpoint

    stored = dict(read_checkpoint(ckpt, "--ckpt", mmap=True).get("datamodule_hyper_parameters") or {})
    class_path = stored.pop("_class_path", None)
    if class_path is None:
        raise ConfigError(f"--reference data:SPLIT: {ckpt} does not record its data module; name a dataset instead")
    return instantiate_datamodule(class_path, {k: v for k, v in stored.items() if not k.startswith("_")}, "--reference data:SPLIT")
