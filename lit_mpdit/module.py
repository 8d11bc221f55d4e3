"""The LightningModule: a ready-built DiT, the diffusion loss, optimizer presets per family, sampling."""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from fractions import Fraction

import lightning as L
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

from lit_mpdit.config import model_design, paper_variant
from lit_mpdit.diffusion import SAMPLERS, GaussianDiffusion
from lit_mpdit.dit import DiT, build_dit
from lit_mpdit.errors import ConfigError, check_choice, check_range
from lit_mpdit.nn.mp import frozen_weights

COMPILE_MODES = tuple(torch._inductor.list_mode_options())  # torch.compile's modes: default, max-autotune, …


def compile_mode(compile: bool | str) -> str | None:
    """The torch.compile mode of a `compile` option (`true` = `default`); None = eager."""
    return None if compile is False else "default" if compile is True else compile


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: the run is stopped rather than trained on garbage."""


@dataclass(frozen=True)
class OptimizerPreset:
    algorithm: str  # "adamw" or "adam"
    lr: float  # peak learning rate
    betas: tuple[float, float]
    weight_decay: float
    warmup: Fraction  # linear ramp from 0 to lr over this fraction of the run's steps
    decay: Fraction | None  # lr ∝ 1/√(step / s) from step s = this fraction of the run; None = constant
    clip: float | None = None  # gradient-norm clipping
    lr_standard: float | None = None  # the peak learning rate for standard (non-MP) models, where it differs

    def steps(self, max_steps: int) -> tuple[int, int | None]:
        """(warm-up steps, decay start) of a run of `max_steps`: the same shape at 300 steps as at 400K."""
        return int(max_steps * self.warmup), None if self.decay is None else int(max_steps * self.decay)


# The standard DiT recipe (Peebles & Xie 2023), EDM2's optimizer for magnitude-preserving networks with the
# paper's schedule shape, and the paper's own protocol for every model (map-dit's train.py: Adam (0.9, 0.99),
# warm-up over steps/150, inverse-square-root decay from steps/10, gradient norm clipped at 0.1 as on the
# `final` and `old-mod_opts` branches — `morph`'s train.py does not clip, and `old-mod_opts` gives its linear
# weights lr 1e-4 and the rest 1e-2), which lets a grid hold the optimizer fixed across families.
OPTIMIZER_PRESETS: dict[str, OptimizerPreset] = {
    "standard": OptimizerPreset("adamw", 1e-4, (0.9, 0.999), 0.0, Fraction(0), None),
    "mp": OptimizerPreset("adam", 1e-2, (0.9, 0.99), 0.0, Fraction(1, 150), Fraction(1, 10)),
    "paper": OptimizerPreset("adam", 1e-2, (0.9, 0.99), 0.0, Fraction(1, 150), Fraction(1, 10), clip=0.1, lr_standard=1e-4),
}


def lr_factor(step: int, warmup_steps: int, decay_steps: int | None) -> float:
    """Warm-up, then EDM2's inverse-square-root decay (EDM2 Eq. 121 with steps for images)."""
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay = 1.0 / math.sqrt(max(step / decay_steps, 1.0)) if decay_steps else 1.0
    return ramp * decay


class DiffusionModule(L.LightningModule):
    """Trains a class-conditional DiT with Gaussian diffusion.

    `input_size`, `in_channels` and `num_classes` are linked from the data module by the CLI.
    """

    def __init__(
        self,
        size: str = "C/4",  # "<depth × width × heads name>/<patch>"
        conditioning: str | None = None,  # the conditioning strategy (None: the variant's, else adaln)
        mp: str | None = None,  # rung of the magnitude-preserving ladder, A = the standard DiT … E (None: the variant's, else A)
        variant: str | None = None,  # a model of the paper's code (config.PAPER_VARIANTS)
        norm: str | None = None,  # override the rung's normalization
        flags: dict[str, bool | int | str] | None = None,  # override single design flags, e.g. {cosine_attention: true, gate: rotation}
        input_size: int = 28,  # image (or latent) side; linked from the data
        in_channels: int = 1,  # image (or latent) channels; linked from the data
        num_classes: int = 10,  # linked from the data; the null class is num_classes
        learn_sigma: bool = True,  # learned variance, trained with L_vlb
        class_dropout: float = 0.1,  # probability of the null class while training (for guidance)
        num_timesteps: int = 1000,  # T
        optimizer: str = "auto",  # auto = the preset of the model's family; paper = map-dit's, for either family
        lr: float | None = None,  # None = the preset's
        warmup_steps: int | None = None,  # None = the preset's fraction of max_steps
        decay_steps: int | None = None,  # decay start; None = the preset's fraction of max_steps; 0 = constant
        sample_steps: int = 50,  # sampling steps for grids and `sample`
        sampler: str = "ddpm",  # for grids and `sample`
        guidance: float = 1.5,  # classifier-free guidance scale for grids and `sample`
        clip_x0: bool = True,  # clamp predicted x_0 to [-1, 1] when sampling (pixels: yes; latents: no)
        compile: bool | str = False,  # torch.compile the training pass (forward and backward): true, or a mode of COMPILE_MODES; `sample(compile=)` for sampling
        predict_per_class: int = 8,  # `predict`: images drawn per class (with the sampling options above)
    ):
        super().__init__()
        self.save_hyperparameters()
        check_choice("model.optimizer", optimizer, ["auto", *OPTIMIZER_PRESETS])
        if variant is not None:
            paper_variant(variant)  # an unknown name: one line naming the allowed ones
        check_choice("model.sampler", sampler, SAMPLERS)
        if not isinstance(compile, bool):
            check_choice("model.compile", compile, ["true", "false", *COMPILE_MODES])
        for option, value, low, high, open_low in (
            ("model.num_timesteps", num_timesteps, 1, None, False),
            ("model.sample_steps", sample_steps, 1, num_timesteps, False),
            ("model.lr", lr, 0, None, True),
            ("model.warmup_steps", warmup_steps, 0, None, False),
            ("model.decay_steps", decay_steps, 0, None, False),
            ("model.guidance", guidance, 0, None, False),
            ("model.predict_per_class", predict_per_class, 1, None, False),
        ):
            check_range(option, value, low, high, open_low=open_low)
        if not 0.0 <= class_dropout < 1.0:
            raise ConfigError(f"model.class_dropout: must be in [0, 1), got {class_dropout}")
        design = model_design(variant, conditioning, mp, norm, flags)
        self.net: DiT = build_dit(
            size, input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma, **design
        )
        self.diffusion = GaussianDiffusion(num_timesteps, learn_sigma=learn_sigma)
        # Only the training pass is compiled: evaluation runs the network in eval mode without gradients, at
        # other batch sizes, each of which would compile a graph of its own for a few hundred passes.
        # Kept outside the module's registry, so parameter names, checkpoints and EMA copies are the eager net's.
        mode = compile_mode(compile)
        self.__dict__["_compiled_net"] = torch.compile(self.net, dynamic=False, mode=mode) if mode else None

    @property
    def null_class(self) -> int:
        return self.hparams.num_classes

    def preset(self) -> OptimizerPreset:
        """The optimizer preset with this module's overrides, its learning rate the one of the model's family."""
        family = self.net.cfg.mp.family
        p = OPTIMIZER_PRESETS[family if self.hparams.optimizer == "auto" else self.hparams.optimizer]
        lr = p.lr_standard if family == "standard" and p.lr_standard is not None else p.lr
        return dataclasses.replace(p, lr=lr if self.hparams.lr is None else self.hparams.lr)

    def schedule(self, max_steps: int) -> tuple[int, int | None]:
        """(warm-up steps, decay start) for a run of `max_steps`: the preset's fractions unless set in steps."""
        h = self.hparams
        warmup, decay = self.preset().steps(max_steps)
        return (warmup if h.warmup_steps is None else h.warmup_steps, decay if h.decay_steps is None else (h.decay_steps or None))

    def run_steps(self) -> int:
        """The optimizer steps of the run being trained (the schedule's denominator)."""
        trainer = self._trainer
        if trainer is None:
            return 0
        return trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)

    def configure_optimizers(self):
        p = self.preset()
        warmup, decay = self.schedule(self.run_steps())
        cls = torch.optim.AdamW if p.algorithm == "adamw" else torch.optim.Adam
        # One fused kernel per parameter and step (with the paper preset's clipping 3× faster than foreach at S/4
        # on a CPU); not where a gradient scaler (fp16) would need the gradients unscaled before they are clipped.
        fused = p.clip is None or not self.scales_gradients()
        opt = cls(self.net.parameters(), lr=p.lr, betas=p.betas, weight_decay=p.weight_decay, fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, decay))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """The preset's gradient-norm clipping (map-dit clips at 0.1), unless the trainer sets its own."""
        clip = self.preset().clip
        if gradient_clip_val is None and clip is not None:
            gradient_clip_val, gradient_clip_algorithm = clip, "norm"
        if gradient_clip_val and optimizer.defaults.get("fused") and not self.scales_gradients():
            # Nothing is scaled, so the gradients are true and the base plugin's clipping is exact; Lightning's
            # mixed-precision plugin refuses to clip beside any fused optimizer, in bf16 too, where nothing is.
            Precision.clip_gradients(self.trainer.precision_plugin, optimizer, gradient_clip_val, GradClipAlgorithmType(gradient_clip_algorithm or "norm"))
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def scales_gradients(self) -> bool:
        """Whether the trainer's precision keeps the gradients scaled until the optimizer step (fp16's GradScaler)."""
        return getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None) is not None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, y)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Timesteps, noise and class dropout come from the global generator: a resumed run must
        # continue its stream, not restart it from the seed.
        # On a GPU they come from the device's generator; every process's advanced alike (each draws the
        # global batch), so the saving process's state is every process's.
        checkpoint["rng_state"] = torch.get_rng_state()
        if self.device.type == "cuda":
            checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state(self.device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["rng_state"])
        if "cuda_rng_state" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state(checkpoint["cuda_rng_state"])  # the process's device: chosen before restoring

    def on_train_start(self) -> None:
        # Lightning's DDP re-seeds every process after the model is built and a single process does not:
        # a fresh run restarts the stream from the seed either way, so N processes draw what one does.
        if self.global_step == 0:  # a resumed run continues the stream its checkpoint restored
            reset_seed()

    def shard(self) -> tuple[int, int]:
        """(rank, world size) of the data-parallel run this module trains in; (0, 1) alone."""
        trainer = self._trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def losses(
        self,
        x: torch.Tensor,  # (B, C, H, W), this process's part of the global batch
        y: torch.Tensor,  # (B,)
        generator: torch.Generator | None = None,  # None = the global stream
        shard: tuple[int, int] = (0, 1),  # (rank, world): draw for the whole global batch, keep this rank's part
    ) -> dict[str, torch.Tensor]:
        """Mean losses over random timesteps and noise. Every rank draws the random numbers of the global batch
        and keeps its slice, so W processes of batch B train exactly as one process of batch B·W."""
        rank, world = shard
        part = slice(rank * len(x), (rank + 1) * len(x))
        k = torch.randint(0, self.diffusion.num_steps, (world * len(x),), device=x.device, generator=generator)[part]
        noise = torch.randn((world * len(x), *x.shape[1:]), device=x.device, generator=generator)[part]
        net = self._compiled_net if self._compiled_net is not None and self.net.training else self.net
        return {k_: v.mean() for k_, v in self.diffusion.training_losses(net, x, k, y, noise).items()}

    def training_step(self, batch, batch_idx):
        x, y = batch
        rank, world = self.shard()
        drop = torch.rand(world * len(y), device=y.device)[rank * len(y) : (rank + 1) * len(y)] < self.hparams.class_dropout
        losses = self.losses(x, torch.where(drop, self.null_class, y), shard=(rank, world))
        if not torch.isfinite(losses["loss"]):
            raise NonFiniteLossError(
                f"non-finite training loss {losses['loss'].item()} at step {self.global_step} "
                f"(mse {losses['mse'].item()}, vb {losses['vb'].item()}): lower --model.lr or use bf16/fp32 consistently"
            )
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=False, sync_dist=world > 1)
        self.log("loss", losses["loss"], prog_bar=True, logger=False)
        return losses["loss"]

    def evaluation_losses(self, batch, batch_idx: int, split: str) -> None:
        x, y = batch
        # The same noise and steps at every evaluation, so curves compare across steps and runs.
        gen = torch.Generator(device=x.device).manual_seed(batch_idx)
        losses = self.losses(x, y, generator=gen)
        self.log_dict({f"{split}/{k}": v for k, v in losses.items()}, prog_bar=False, sync_dist=True)
        self.log(f"{split}_loss", losses["loss"], prog_bar=True, logger=False, sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self.evaluation_losses(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        """`test`: the diffusion losses on the data module's test split (FID: `evaluate`)."""
        self.evaluation_losses(batch, batch_idx, "test")

    def predict_dataloader(self):
        """`predict`: the labels to draw, `predict_per_class` of every class, in class order."""
        from lit_mpdit.images import class_grid_labels

        labels = class_grid_labels(self.hparams.num_classes, self.hparams.predict_per_class, self.hparams.num_classes)
        return torch.utils.data.DataLoader(labels, batch_size=256)

    def predict_step(self, batch, batch_idx):
        """Samples for a batch of labels, as uint8 images (decoded by the data module where it has a decoder)."""
        samples = self.sample(batch, seed=batch_idx)
        data = self.trainer.datamodule if self._trainer is not None else None
        from lit_mpdit.images import to_uint8

        images = data.to_images(samples) if data is not None and hasattr(data, "to_images") else to_uint8(samples)
        return {"images": images.cpu(), "labels": batch.cpu()}

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,  # (N,) classes to draw
        *,
        steps: int | None = None,  # None = hparams.sample_steps
        sampler: str | None = None,
        guidance: float | None = None,
        seed: int = 0,
        batch_size: int = 256,
        compile: bool = False,  # through torch.compile: one graph per batch shape, compiled on first use and kept
    ) -> torch.Tensor:
        """Samples in the data's range (N, C, H, W), drawn with the current weights in eval mode. Compiled, the
        batches are made equal (at most `batch_size`, sizes differing by at most one: at most two graphs), so the
        noise is drawn in other chunks than eager sampling's and the samples differ from it as another seed's do."""
        h = self.hparams
        diffusion = self.diffusion.respaced(steps or h.sample_steps)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        labels = labels.to(self.device)
        batches = labels.tensor_split(-(-len(labels) // batch_size)) if compile else labels.split(batch_size)
        net = self.net
        if compile:  # kept outside the module's registry, like the training pass's (see __init__)
            if "_compiled_sampler" not in self.__dict__:
                self.__dict__["_compiled_sampler"] = torch.compile(self.net, dynamic=False)
            net = self.__dict__["_compiled_sampler"]
        was_training = self.training
        self.eval()
        out = []
        with frozen_weights(self.net):  # normalized once for every step of every batch
            for y in batches:
                noise = torch.randn((len(y), h.in_channels, h.input_size, h.input_size), generator=gen, device=self.device)
                out.append(
                    diffusion.sample(
                        net,
                        noise,
                        y,
                        sampler=sampler or h.sampler,
                        guidance=h.guidance if guidance is None else guidance,
                        null_class=self.null_class,
                        clip_x0=h.clip_x0,
                        generator=gen,
                    )
                )
        self.train(was_training)
        return torch.cat(out)


WEIGHTS = ("ema", "current")


CHECKPOINT_KEYS = ("state_dict", "hyper_parameters", "pytorch-lightning_version")  # what `fit` writes and resumes from


def read_checkpoint(ckpt: str, option: str, map_location: str = "cpu", mmap: bool = False) -> dict:
    """torch.load with one clear error for a missing, truncated, corrupt or foreign file (`mmap`: check cheaply)."""
    try:
        record = torch.load(ckpt, map_location=map_location, weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise ConfigError(f"{option}: no checkpoint at {ckpt}") from None
    except Exception as e:  # truncated, corrupt or foreign files fail in many ways inside torch.load
        raise ConfigError(f"{option}: {ckpt} is not a readable lit_mpdit checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise ConfigError(f"{option}: {ckpt} is not a lit_mpdit checkpoint (it lacks {', '.join(missing)}); give a file written by `fit`")
    return record


def load_module(ckpt: str, weights: str = "ema", map_location: str = "cpu") -> DiffusionModule:
    """A trained module from a checkpoint, with its EMA weights (if it has them) or its current ones.

    Lightning's EMA callback stores the averaged weights as `state_dict` and the raw ones as
    `current_model_state`; a run without EMA has only the raw ones, which both choices return.
    """
    check_choice("--weights", weights, WEIGHTS)
    checkpoint = read_checkpoint(ckpt, "--ckpt", map_location)
    try:
        accepted = inspect.signature(DiffusionModule.__init__).parameters  # LightningCLI adds its own keys
        module = DiffusionModule(**{k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted})
    except ConfigError:
        raise
    except Exception as e:  # a foreign checkpoint
        raise ConfigError(f"--ckpt: {ckpt} is not a readable lit_mpdit checkpoint ({type(e).__name__}: {e})") from None
    state = checkpoint.get("current_model_state") if weights == "current" else None
    module.load_state_dict(state or checkpoint["state_dict"])
    module.trained_steps = checkpoint.get("global_step", 0)  # optimizer steps behind these weights
    return module.eval()
