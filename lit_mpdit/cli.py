"""Command line: LightningCLI for fit/validate/test/predict, plus sample, evaluate, fid, prepare-latents.

Every bad option ends in one line naming the option and the allowed values, exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from lit_mpdit.errors import config_error
from lit_mpdit.runtime import keep_freed_memory

PROG = "python -m lit_mpdit"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
SAMPLING_OPTIONS = ("sample_steps", "sampler", "guidance", "clip_x0", "predict_per_class", "compile")  # a checkpoint's may be changed
LINKED_FROM_DATA = ("input_size", "in_channels", "num_classes")


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI of this suite; `run=False` builds model, data and trainer without running (sweeps)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from lit_mpdit.errors import ConfigError, check_writable
    from lit_mpdit.module import DiffusionModule, read_checkpoint

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            # The network's shape follows the data: no hard-coded class or channel counts.
            for source, target in (("image_size", "input_size"), ("in_channels", "in_channels"), ("num_classes", "num_classes")):
                parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")
            describe_options(parser)

        def parse_arguments(self, parser, args):
            # Given `args`, Lightning warns whenever sys.argv holds arguments too, printing them all (a sweep's whole
            # command line, once per cell); they are the caller's own, never read here: it sees the program name alone.
            argv = sys.argv
            sys.argv = argv[:1] if args is not None else argv
            try:
                super().parse_arguments(parser, args)
            finally:
                sys.argv = argv
            # Lightning reads --ckpt_path right after parsing (for its hyperparameters): refuse a bad file first.
            command = self.config.get("subcommand")
            ckpt = self.config[command].get("ckpt_path") if command else None
            if ckpt not in (None, "last", "best", "hpc", "registry"):
                read_checkpoint(ckpt, "--ckpt_path", mmap=True)

        def _parse_ckpt_path(self):
            """Lightning replaces the model's options with the checkpoint's: an option that was set otherwise
            (not left at its default) and that the checkpoint contradicts is refused instead of dropped, and the
            sampling options (how to draw, not what was trained) keep the command line's value."""
            command = self.config.get("subcommand")
            if not command or not self.config[command].get("ckpt_path"):
                return super()._parse_ckpt_path()
            defaults = self.parser._subcommands_action._name_parser_map[command].get_defaults().model
            before = dict(vars(self.config[command].model))
            super()._parse_ckpt_path()
            after = self.config[command].model
            for key, value in before.items():
                stored = getattr(after, key, None)
                if value == stored or value == getattr(defaults, key, None) or key in LINKED_FROM_DATA:
                    continue
                if key in SAMPLING_OPTIONS:
                    setattr(after, key, value)
                else:
                    trained = "left it unset (its default)" if stored is None else f"was trained with {stored!r}"
                    raise ConfigError(
                        f"model.{key}: {value!r} contradicts the checkpoint given by --ckpt_path, which {trained}; "
                        "drop the option or give the checkpoint's value"
                    )

        def before_instantiate_classes(self):
            """Refuse an unwritable output folder before any class is built (MLflow's logger creates its database),
            and trainer options that would fail (or silently change) once training has started."""
            command = self.config.get("subcommand")
            trainer = (self.config[command] if command else self.config).trainer
            for option, folder in output_folders(trainer):
                check_writable(folder, option)
            check_trainer(trainer)

    # Parse errors raise (and `main` prints them in one line) instead of printing the whole usage; the seed is
    # in every run's config.yaml, so Lightning's "Seed set to" line is not printed (it came before any error).
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    one_line = {"exit_on_error": False}
    from lit_mpdit.trainer import Trainer

    return CLI(
        DiffusionModule,
        L.LightningDataModule,
        trainer_class=Trainer,  # precision: auto
        subclass_mode_data=True,
        args=args,
        run=run,
        parser_kwargs={"prog": PROG, **one_line, **({c: one_line for c in LIGHTNING_COMMANDS} if run else {})},
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def parameter_comments(function: Callable) -> dict[str, str]:
    """Each parameter's trailing comment in the source of `function`'s signature (this suite documents its
    options there, one per line)."""
    signature = inspect.getsource(function).split("):\n", 1)[0]
    return {m["name"]: m["comment"] for m in re.finditer(r"^\s+(?P<name>\w+):[^#\n]*#\s*(?P<comment>.+)$", signature, re.M)}


def allowed_values() -> dict[str, str]:
    """The allowed values of the model's choice options, from the tables that define them."""
    from lit_mpdit.conditioning import NAMED_STRATEGIES, OPERATIONS
    from lit_mpdit.config import LADDER, NORMS, PAPER_VARIANTS, PATCH_SIZES, SIZES, MPFlags
    from lit_mpdit.diffusion import SAMPLERS
    from lit_mpdit.module import OPTIMIZER_PRESETS

    return {
        "size": [f"{n}/{p}" for n in SIZES for p in PATCH_SIZES],
        "conditioning": [*dict.fromkeys([*NAMED_STRATEGIES, *OPERATIONS]), f"any '+' combination of {', '.join(OPERATIONS)}"],
        "mp": list(LADDER),
        "variant": list(PAPER_VARIANTS),
        "norm": list(NORMS),
        "sampler": list(SAMPLERS),
        "optimizer": ["auto", *OPTIMIZER_PRESETS],
        "flags": [f"keys {', '.join(f.name for f in dataclasses.fields(MPFlags))}"],
    }


def describe_options(parser) -> None:
    """`fit --help`: every model option with its comment and allowed values, and this suite's data modules."""
    from lit_mpdit.data import DATAMODULES
    from lit_mpdit.module import DiffusionModule

    helps = {f"model.{k}": v for k, v in parameter_comments(DiffusionModule.__init__).items()}
    for key, values in allowed_values().items():
        helps[f"model.{key}"] = f"{helps.get(f'model.{key}', '')}; allowed: {', '.join(values)}"
    modules = ", ".join(f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}" for cls in dict.fromkeys(DATAMODULES.values()))
    helps["data"] = f"a data module with its init_args; this suite's: {modules}"
    for action in parser._actions:  # argparse keeps the help text on each action
        if action.dest in helps:
            action.help = helps[action.dest]


def check_trainer(trainer) -> None:
    """Trainer options refused before any work: a step budget that trains nothing or is negative, an
    accelerator the machine does not have, a precision the CPU would silently replace."""
    import torch

    from lit_mpdit.errors import ConfigError

    max_steps = trainer.get("max_steps")
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        raise ConfigError(f"--trainer.max_steps: {max_steps} trains nothing; allowed: a positive number of steps, or -1 (use max_epochs)")
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--trainer.accelerator: {accelerator} asked for, but this machine has no CUDA GPU; allowed here: cpu, auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    precision = str(trainer.get("precision") or "32-true")
    if on_cpu and precision in ("16-mixed", "16", "16-true"):
        raise ConfigError(f"--trainer.precision: {precision} needs a GPU (on CPUs Lightning would use bf16 instead); allowed on CPU: 32-true, bf16-mixed, bf16-true")
    if on_cpu and precision.startswith("bf16"):
        from lit_mpdit.runtime import native_bf16

        if not native_bf16():
            warnings.warn(f"--trainer.precision {precision}: this CPU has no native bf16 (no AVX-512), so every bf16 product is emulated and training runs many times slower than 32-true", stacklevel=2)


def output_folders(trainer) -> Iterator[tuple[str, Path]]:
    """(option, folder) for each folder the trainer's configuration (a parsed namespace) writes to."""
    yield "--trainer.default_root_dir", Path(trainer.get("default_root_dir") or ".")
    for kind, key in (("logger", "save_dir"), ("callbacks", "dirpath")):
        entries = trainer.get(kind)
        for entry in entries if isinstance(entries, list) else [entries]:
            init_args = entry.get("init_args") if hasattr(entry, "get") else None
            if not init_args:
                continue
            name = f"--trainer.{kind} {entry.class_path.rsplit('.', 1)[-1]}"
            if init_args.get(key):
                yield f"{name}.{key}", Path(init_args[key])
            if str(init_args.get("tracking_uri") or "").startswith("sqlite:///"):
                yield f"{name}.tracking_uri", Path(init_args["tracking_uri"].removeprefix("sqlite:///")).parent


def sample_main(argv: list[str]) -> None:
    """python -m lit_mpdit sample --ckpt C --out grid.png: one class per row."""
    p = argparse.ArgumentParser(prog="python -m lit_mpdit sample", description=sample_main.__doc__)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by `fit`")
    p.add_argument("--out", default="samples.png", help="PNG file to write")
    p.add_argument("--per-class", type=int, default=8, help="images per row")
    p.add_argument("--classes", type=int, default=None, help="rows: the first N classes (default: up to 10)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--sampler", default=None, help="ddpm, ddim, dpm++2m or sde-dpm++2m (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--weights", default="ema", help="ema (the averaged weights, if trained with EMA) or current")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from lit_mpdit.diffusion import SAMPLERS
    from lit_mpdit.errors import check_choice, check_output_file, check_range
    from lit_mpdit.images import IMAGE_SUFFIXES, class_grid_labels, save_grid, to_uint8
    from lit_mpdit.module import load_module

    check_output_file(args.out, "--out", IMAGE_SUFFIXES)
    if args.sampler is not None:
        check_choice("--sampler", args.sampler, SAMPLERS)
    check_range("--per-class", args.per_class, 1)
    check_range("--classes", args.classes, 1)
    check_range("--steps", args.steps, 1)
    check_range("--guidance", args.guidance, 0)
    module = load_module(args.ckpt, args.weights)
    check_range("--classes", args.classes, 1, module.hparams.num_classes)  # the checkpoint's classes
    classes = args.classes or min(10, module.hparams.num_classes)
    check_range("--steps", args.steps, 1, module.diffusion.num_steps)
    labels = class_grid_labels(module.hparams.num_classes, args.per_class, classes)
    samples = module.sample(labels, steps=args.steps, sampler=args.sampler, guidance=args.guidance, seed=args.seed)
    from lit_mpdit.evaluate import checkpoint_datamodule, generates_pixels

    # Latents are decoded by the VAE of the data module the checkpoint was trained with.
    images = to_uint8(samples) if generates_pixels(module) else checkpoint_datamodule(args.ckpt).to_images(samples)
    print(save_grid(images, args.out, nrow=args.per_class))


def evaluate_main(argv: list[str] | None = None) -> None:
    """python -m lit_mpdit evaluate --ckpt C: FID-N of a checkpoint (or an untrained model) with its protocol, as JSON."""
    from lit_mpdit.evaluate import Protocol, checkpoint_datamodule, evaluate, generates_pixels, load_for_evaluation
    from lit_mpdit.errors import ConfigError, check_choice, check_output_file

    p = argparse.ArgumentParser(prog="python -m lit_mpdit evaluate", description=evaluate_main.__doc__)
    d = Protocol()
    p.add_argument("--ckpt", default=None, help="a checkpoint written by `fit`; omit with --untrained")
    p.add_argument("--untrained", action="store_true", help="evaluate a freshly initialised model (a baseline), built from --config")
    p.add_argument("--config", default="configs/fmnist.yaml", help="with --untrained: the model's config")
    p.add_argument(
        "--reference",
        default="fashion_mnist:test",
        help="reference set DATASET:SPLIT (fashion_mnist, fashion_mnist_sample, cifar10), or data:SPLIT for the "
        "checkpoint's own data module (latent models: its VAE decodes the samples, its references give the images)",
    )
    p.add_argument("--n", type=int, default=d.n_fake, help="generated images")
    p.add_argument("--n-ref", type=int, default=d.n_ref, help="reference images")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--sampler", default=d.sampler, help="ddpm, ddim, dpm++2m or sde-dpm++2m")
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--weights", default=d.weights, help="ema, current, or posthoc (with --sigma-rel)")
    p.add_argument("--sigma-rel", type=float, default=None, help="σ_rel of the post-hoc EMA")
    p.add_argument("--snapshots", default=None, help="post-hoc EMA snapshot folder (default: <run>/ema_snapshots)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--precision", default=d.precision, help="Inception precision: fp32, bf16, or auto (bf16 where it is faster than fp32 here)")
    p.add_argument("--bootstrap", type=int, default=d.bootstrap)
    p.add_argument("--sample-precision", default=d.sample_precision, help="the denoiser's precision while sampling: fp32, bf16 or auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser for sampling (pays for large --n)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    from lit_mpdit.evaluate import WEIGHT_CHOICES

    # init is what --untrained evaluates, not a choice of --weights
    check_choice("--weights", args.weights, [w for w in WEIGHT_CHOICES if w != "init"])
    if args.out:
        check_output_file(args.out, "--out")  # before minutes of sampling whose result it would lose

    from lit_mpdit.metrics.fid import DATASETS, parse_dataset_spec

    own = args.reference.startswith("data:")
    spec = ("data", args.reference[len("data:") :], None) if own else parse_dataset_spec(args.reference)
    if spec is None or not spec[1]:
        raise ConfigError(f"--reference: {args.reference!r} is not DATASET:SPLIT; datasets: data (the checkpoint's), {', '.join(DATASETS)}")
    dataset, split, _ = spec
    if own and args.ckpt is None:
        raise ConfigError("--reference data:SPLIT names the checkpoint's data module: give --ckpt")
    weights = "init" if args.untrained else args.weights
    protocol = Protocol(args.n, args.n_ref, split, args.steps, args.sampler, args.guidance, weights, args.sigma_rel, args.seed, args.precision, args.bootstrap, args.sample_precision, args.compile)
    if args.untrained == (args.ckpt is not None):
        raise ConfigError("evaluate: give exactly one of --ckpt C and --untrained")
    if args.untrained:
        module = untrained_module(args.config)
    else:
        module = load_for_evaluation(args.ckpt, protocol, args.snapshots)
    if own:
        from lit_mpdit.data import reference_name

        data = checkpoint_datamodule(args.ckpt)
        result = evaluate(module, reference_name(data, split), lambda: data.reference_images(split, args.n_ref), protocol, data.to_images)
    elif not generates_pixels(module):
        raise ConfigError(
            f"--reference: this model generates {module.hparams.in_channels}-channel latents, which {dataset} images "
            "cannot be compared with; use --reference data:SPLIT (its data module decodes them with its VAE)"
        )
    else:
        result = evaluate(module, f"{dataset}:{split}", lambda: DATASETS[dataset]().reference_images(split, args.n_ref), protocol)
    result["checkpoint"] = args.ckpt or "untrained"
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def untrained_module(config: str):
    """The model of a config at initialisation, seeded as `fit` seeds it."""
    import lightning as L

    L.seed_everything(0, verbose=False)
    from lit_mpdit.runtime import quiet_loggers

    # The Trainer is built only for the model: its "GPU available" lines and litlogger tip would mislead.
    with quiet_loggers("lightning.pytorch.utilities.rank_zero"):
        cli = lightning_cli(["--config", config, "--trainer.logger", "false", "--trainer.callbacks", "[]"], run=False)
    return cli.model


def commands() -> dict[str, Callable[[list[str]], None]]:
    def fid(argv):
        from lit_mpdit.metrics.fid import main

        main(argv)

    def prepare_latents(argv):
        from lit_mpdit.latents import main

        main(argv)

    return {"sample": sample_main, "evaluate": evaluate_main, "fid": fid, "prepare-latents": prepare_latents}


SUBCOMMANDS = {  # the top-level --help, one line each
    "fit": "train a model (LightningCLI: --config configs/fmnist.yaml, --model.*, --data.*, --trainer.*)",
    "validate": "the diffusion losses of a checkpoint on the validation split",
    "test": "the diffusion losses of a checkpoint on the test split",
    "predict": "samples of a checkpoint for given classes, written as images and an .npz",
    "sample": "a grid of samples of a checkpoint, one class per row",
    "evaluate": "FID-N of a checkpoint (or an untrained model) with its protocol, as JSON",
    "fid": "FID between two sets of images (folders, .npz files or datasets)",
    "prepare-latents": "encode a dataset with a VAE into the latents file the latent data module reads",
}


def usage() -> str:
    lines = [f"usage: {PROG} SUBCOMMAND [options]   (SUBCOMMAND --help for its options)", "", "subcommands:"]
    return "\n".join(lines + [f"  {name:<16} {text}" for name, text in SUBCOMMANDS.items()])


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import ArgumentError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] not in SUBCOMMANDS:
        print(f"error: unknown subcommand {argv[0]!r}; allowed: {', '.join(SUBCOMMANDS)} (see {PROG} --help)", file=sys.stderr)
        sys.exit(2)
    keep_freed_memory()
    own = commands()
    try:
        if argv[0] in own:
            own[argv[0]](argv[1:])
        else:
            lightning_cli(argv)
    except ArgumentError as e:  # jsonargparse's parse errors, one line instead of the usage
        message = " ".join(str(e).split())
        print(f"error: {message} (see {PROG} {argv[0]} --help)", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        error = config_error(e)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
