"""Callbacks: sample grids logged as artifacts."""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lit_mpdit.errors import check_choice
from lit_mpdit.images import class_grid_labels, save_grid, to_uint8
from lit_mpdit.runs import log_artifact, run_dir


class SampleGrid(L.Callback):
    """Draws a class-per-row grid every `every_n_steps` steps (0 = never) and at the end of fit.

    At the end of fit Lightning's EMA callback has already copied the averaged weights in, so the
    final grid shows the EMA model when one is used.
    """

    def __init__(
        self,
        every_n_steps: int = 0,  # 0 = only at the end of fit
        per_class: int = 8,  # images per row
        max_classes: int = 10,  # rows
        seed: int = 0,  # the same noise every time, so grids compare across steps
    ):
        self.every_n_steps, self.per_class, self.max_classes, self.seed = every_n_steps, per_class, max_classes, seed

    def draw(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> None:
        folder = run_dir(trainer) / "samples"  # on every rank: under DDP `trainer.log_dir` is a broadcast
        if not trainer.is_global_zero:
            return
        labels = class_grid_labels(module.hparams.num_classes, self.per_class, self.max_classes)
        samples = module.sample(labels, seed=self.seed)
        data = trainer.datamodule  # latents are decoded to images by their data module
        images = data.to_images(samples) if hasattr(data, "to_images") else to_uint8(samples)
        path = save_grid(images, folder / f"{name}.png", nrow=self.per_class)
        log_artifact(trainer, path, "samples")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.draw(trainer, pl_module, f"step{trainer.global_step:07d}")

    def on_fit_end(self, trainer, pl_module):
        self.draw(trainer, pl_module, "final")


class SampleWriter(BasePredictionWriter):
    """Writes what `predict` drew: `predictions.npz` (uint8 images N×H×W×C and their labels) and a grid PNG
    with one class per row, into `output_dir` (default: the run's folder/predictions)."""

    def __init__(self, output_dir: str | None = None):
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        if not trainer.is_global_zero or not predictions:
            return
        import numpy as np

        folder = Path(self.output_dir) if self.output_dir else run_dir(trainer) / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        images = torch.cat([p["images"] for p in predictions])
        labels = torch.cat([p["labels"] for p in predictions])
        np.savez(folder / "predictions.npz", images=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
        save_grid(images, folder / "predictions.png", nrow=pl_module.hparams.predict_per_class)
        print(f"predict: {len(images)} images in {folder / 'predictions.npz'} and {folder / 'predictions.png'}")


class Throughput(L.Callback):
    """Training images per second, measured over optimizer steps only (no validation, no sampling)."""

    def __init__(self, skip_steps: int = 2):  # the first steps warm up allocators and kernels
        self.skip_steps = skip_steps
        self.images = 0
        self.steps = 0
        self.seconds = 0.0
        self.warmup_seconds = 0.0  # the skipped steps' (with torch.compile: its first compile)
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is not None and trainer.global_step > self.skip_steps:
            self.seconds += time.perf_counter() - self._start
            self.images += len(batch[0]) * trainer.world_size
            self.steps += 1
        elif self._start is not None:
            self.warmup_seconds += time.perf_counter() - self._start
        self._start = None

    @property
    def warmup_excess(self) -> float:
        """What the skipped steps took beyond steps at the measured pace: a first compile, first allocations."""
        if not self.steps:
            return 0.0
        return max(0.0, self.warmup_seconds - self.skip_steps * self.seconds / self.steps)

    @property
    def images_per_second(self) -> float | None:
        return self.images / self.seconds if self.seconds else None


class MagnitudeDiagnostics(L.Callback):
    """The paper's magnitude analysis: per-block activation RMS and weight RMS over training.

    Every `every_n_steps` steps the network runs on one fixed probe (the first training batch,
    noised at fixed steps with fixed noise), and each block's output RMS is logged as
    `diag/act_rms/block_<i>`, with the RMS of the block's stored weights as `diag/weight_rms/block_<i>`.
    `diag/class_spread` says how much the condition moves the prediction: the RMS over the probe of the
    spread of ε̂ across the classes, relative to ε̂'s RMS (0 = the network ignores the class).
    """

    def __init__(
        self,
        every_n_steps: int = 50,  # how often to measure
        probe_size: int = 32,  # images in the probe batch
    ):
        self.every_n_steps, self.probe_size = every_n_steps, probe_size
        self._probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._probe is None:
            x, y = batch[0][: self.probe_size], batch[1][: self.probe_size]
            gen = torch.Generator(device=x.device).manual_seed(0)
            k = torch.linspace(0, pl_module.diffusion.num_steps - 1, len(x), device=x.device).long()
            xt = pl_module.diffusion.q_sample(x, k, torch.randn(x.shape, generator=gen, device=x.device))
            self._probe = (xt, k, y)
        if trainer.global_step % self.every_n_steps == 0:
            self.measure(trainer, pl_module)

    @torch.no_grad()
    def measure(self, trainer, pl_module) -> None:
        net = pl_module.net
        rms: list[float] = []
        hooks = [b.register_forward_hook(lambda m, i, out: rms.append(out.float().square().mean().sqrt().item())) for b in net.blocks]
        was_training = net.training
        net.eval()
        try:
            xt, k, y = self._probe
            net(xt, k, y)
        finally:
            for h in hooks:
                h.remove()
            net.train(was_training)
        metrics = {f"diag/act_rms/block_{i}": r for i, r in enumerate(rms)}
        metrics["diag/class_spread"] = class_spread(net, *self._probe[:2], pl_module.hparams.num_classes)
        for i, block in enumerate(net.blocks):
            weights = [p for name, p in block.named_parameters() if name.endswith("weight")]
            total = sum(w.square().sum() for w in weights) / sum(w.numel() for w in weights)
            metrics[f"diag/weight_rms/block_{i}"] = total.sqrt().item()
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)


@torch.no_grad()
def class_spread(net: torch.nn.Module, xt: torch.Tensor, k: torch.Tensor, num_classes: int, max_classes: int = 10) -> float:
    """RMS over samples and pixels of the standard deviation of ε̂(x_t, t, y) across classes y, divided by the
    RMS of ε̂: how far the class moves the denoiser's prediction, relative to the prediction."""
    was_training = net.training
    net.eval()
    try:
        classes = range(min(num_classes, max_classes))
        eps = torch.stack([net(xt, k, torch.full_like(k, y))[:, : xt.shape[1]].float() for y in classes])  # (Y, N, C, H, W)
    finally:
        net.train(was_training)
    return (eps.std(dim=0).square().mean().sqrt() / eps.square().mean().sqrt().clamp_min(1e-12)).item()  # 0 while ε̂ = 0


def averaged_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The module with the EMA weights of a running fit (Lightning's weight averaging), or the module itself
    before the averaging has started or without it."""
    from lightning.pytorch.callbacks import WeightAveraging

    for callback in trainer.callbacks:
        average = getattr(callback, "_average_model", None) if isinstance(callback, WeightAveraging) else None
        start = getattr(callback, "update_starting_at_step", None) or 0
        if average is not None and trainer.global_step > start:
            return average.module
    return pl_module


class PeriodicFID(L.Callback):
    """FID-N every `every_n_steps` steps while training, logged as `val/fid` (and its interval).

    Off unless added to the trainer's callbacks; the network is built outside the LightningModule, so
    EMA copies of the module never carry it. The reference features are cached on disk once.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,  # how often to measure
        n_fake: int = 500,  # generated images per measurement
        n_ref: int = 2000,  # reference images (the data module's split)
        reference_split: str = "test",  # split of the data the reference images come from
        steps: int = 25,  # sampling steps
        sampler: str = "ddpm",
        guidance: float = 1.5,
        precision: str = "auto",  # Inception precision: bf16, fp32, or auto (bf16 where it pays, runtime.bf16_pays)
        sample_precision: str = "fp32",  # the denoiser's precision while sampling: bf16, fp32 or auto
        compile: bool = False,  # torch.compile the denoiser for sampling
        bootstrap: int = 0,  # resamples for an interval; 0 = none
        weights: str = "current",  # current, or ema: the weights of the run's EMA callback once it has started
        seed: int = 0,  # sampling noise: the same at every measurement, so curves compare across steps
        skip_last: bool = False,  # not at trainer.max_steps: a final evaluation measures that point (the sweep)
    ):
        from lit_mpdit.evaluate import Protocol

        check_choice("PeriodicFID.weights", weights, ("current", "ema"))
        self.every_n_steps = every_n_steps
        self.skip_last = skip_last
        self.seconds = 0.0  # spent measuring, in this process
        self.reference_seconds = 0.0  # of which reading (once per cache: computing) the reference features
        self.protocol = Protocol(n_fake, n_ref, reference_split, steps, sampler, guidance, weights, None, seed, precision, bootstrap, sample_precision, compile)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps or not trainer.is_global_zero:
            return
        if self.skip_last and trainer.global_step == trainer.max_steps:
            return
        from lit_mpdit.data import reference_name
        from lit_mpdit.evaluate import evaluate

        data, split = trainer.datamodule, self.protocol.reference_split
        module = averaged_module(trainer, pl_module) if self.protocol.weights == "ema" else pl_module
        result = evaluate(module, reference_name(data, split), lambda: data.reference_images(split, self.protocol.n_ref), self.protocol, data.to_images)
        metrics = {"val/fid": result["fid"]}
        if self.protocol.bootstrap:
            metrics |= {"val/fid_lo": result["fid_lo"], "val/fid_hi": result["fid_hi"]}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.seconds += result["seconds"]["total"]
        self.reference_seconds += result["seconds"]["reference"]
