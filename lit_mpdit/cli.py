"""Command line: LightningCLI for fit/validate/test/predict, plus sample, evaluate, fid, prepare-latents.

Every bad option ends in one line naming the option and the allowed values, exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from lit_mpdit.errors import ConfigError
from lit_mpdit.runtime import keep_freed_memory

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI of this suite; `run=False` builds model, data and trainer without running (sweeps)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from lit_mpdit.module import DiffusionModule

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            # The network's shape follows the data: no hard-coded class or channel counts.
            for source, target in (("image_size", "input_size"), ("in_channels", "in_channels"), ("num_classes", "num_classes")):
                parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")

    return CLI(
        DiffusionModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def sample_main(argv: list[str]) -> None:
    """python -m lit_mpdit sample --ckpt C --out grid.png: one class per row."""
    p = argparse.ArgumentParser(prog="python -m lit_mpdit sample", description=sample_main.__doc__)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by `fit`")
    p.add_argument("--out", default="samples.png", help="PNG file to write")
    p.add_argument("--per-class", type=int, default=8, help="images per row")
    p.add_argument("--classes", type=int, default=10, help="rows: the first N classes")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--sampler", default=None, help="ddpm or ddim (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--weights", default="ema", help="ema (the averaged weights, if trained with EMA) or current")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from lit_mpdit.callbacks import class_grid_labels
    from lit_mpdit.diffusion import SAMPLERS
    from lit_mpdit.errors import check_choice
    from lit_mpdit.images import save_grid, to_uint8
    from lit_mpdit.module import load_module

    if args.sampler is not None:
        check_choice("--sampler", args.sampler, SAMPLERS)
    module = load_module(args.ckpt, args.weights)
    labels = class_grid_labels(module.hparams.num_classes, args.per_class, args.classes)
    images = module.sample(labels, steps=args.steps, sampler=args.sampler, guidance=args.guidance, seed=args.seed)
    print(save_grid(to_uint8(images), args.out, nrow=args.per_class))


def commands() -> dict[str, Callable[[list[str]], None]]:
    def fid(argv):
        from lit_mpdit.metrics.fid import main

        main(argv)

    def prepare_latents(argv):
        from lit_mpdit.latents import main

        main(argv)

    def evaluate(argv):
        from lit_mpdit.evaluate import main

        main(argv)

    return {"sample": sample_main, "evaluate": evaluate, "fid": fid, "prepare-latents": prepare_latents}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    keep_freed_memory()
    own = commands()
    try:
        if argv and argv[0] in own:
            own[argv[0]](argv[1:])
        else:
            lightning_cli(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
