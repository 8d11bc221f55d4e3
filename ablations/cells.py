"""One cell of the ablation grid: its name, the profile it runs at, its LightningCLI configuration, and the
training and evaluation that turn it into a `result.json`.

A cell is (conditioning × rung × seed); `grid.yaml` names the cells, `profiles.yaml` the budget. The study
around the cells (Optuna, MLflow, workers, resume) is `ablations.sweep`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from lit_mpdit.errors import ConfigError, check_choice

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Cell:
    conditioning: str
    mp: str  # a rung A–E or a branch of the paper's code (lit_mpdit.config.GRID_MP_VALUES), '~flag=value' changes
    seed: int

    @property
    def id(self) -> str:
        """'<conditioning>-<mp>-s<seed>', with a branch's '/' written '_' so that the id names a folder."""
        return f"{self.conditioning}-{self.mp.replace('/', '_')}-s{self.seed}"

    @classmethod
    def from_id(cls, cell_id: str) -> Cell:
        from lit_mpdit.config import GRID_MP_VALUES

        head, _, seed = cell_id.rpartition("-s")
        head, tilde, overrides = head.partition("~")  # 'adaln-E~gate=scalar': rung E with one flag changed
        mp = next((v for v in sorted(GRID_MP_VALUES, key=len, reverse=True) if head.endswith("-" + v.replace("/", "_"))), None)
        if mp is None:  # not a known rung: parsed as written, and refused by the grid's check
            head, _, mp = head.rpartition("-")
            return cls(head, mp + tilde + overrides, int(seed))
        return cls(head[: -len(mp) - 1], mp + tilde + overrides, int(seed))


def load_yaml(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def load_profile(name: str) -> dict[str, Any]:
    profiles = {k: v for k, v in load_yaml(HERE / "profiles.yaml").items() if k != "tpe"}
    check_choice("--profile", name, profiles)
    profile = profiles[name]
    steps, every = profile["fit"]["trainer"]["max_steps"], profile.get("checkpoint_every", 100)
    if steps % every:  # cells are evaluated from their final checkpoint
        raise ConfigError(f"profile {name}: checkpoint_every ({every}) must divide trainer.max_steps ({steps})")
    return resolve_precisions(profile)


def resolve_precisions(profile: dict[str, Any]) -> dict[str, Any]:
    """The profile with each "auto" precision made concrete for this machine: bf16 where it is faster than
    fp32 here, fp32 elsewhere (`lit_mpdit.runtime.bf16_pays`)."""
    from lit_mpdit.runtime import resolve_precision

    trainer, ev = profile["fit"]["trainer"], profile["eval"]
    if "precision" in trainer:
        trainer["precision"] = resolve_precision(str(trainer["precision"]), "bf16-mixed", "32-true")
    for key in ("precision", "sample_precision"):
        if key in ev:
            ev[key] = resolve_precision(ev[key], "bf16", "fp32")
    return profile


def precisions_of(profile: dict[str, Any]) -> dict[str, str]:
    """What a profile's cells train, sample and extract features in: one grid keeps one of each."""
    ev = profile["eval"]
    return {"train": str(profile["fit"]["trainer"].get("precision", "32-true")), "inception": ev.get("precision", "fp32"), "sample": ev.get("sample_precision", "fp32")}


def grid_cells(grid: dict[str, Any], seeds: list[int], claim_seeds: list[int] | None = None) -> list[Cell]:
    """Every (conditioning, rung) named by a group, once, for every seed; the cells of the `claims` group also
    for every one of `claim_seeds` (the paper's claims need intervals over seeds, the rest of the table one seed).

    The claims' cells come first, one conditioning at a time, each seed's rungs together (adaln A and E at seeds
    0, 1, 2, then rotation+scale's): a grid cut short, or spanning sessions, decides claim 1 first and holds paired
    seeds. The other cells follow in the groups' order."""
    pairs: list[tuple[str, str]] = []
    for name, group in grid["groups"].items():
        if name == "claims":
            continue
        for mp in group["mp"]:
            for conditioning in group["conditioning"]:
                if (conditioning, mp) not in pairs:
                    pairs.append((conditioning, mp))
    claims = grid["groups"].get("claims", {"conditioning": [], "mp": []})
    claim = [Cell(c, mp, seed) for c in claims["conditioning"] for seed in claim_seeds or [] for mp in claims["mp"]]
    return list(dict.fromkeys(claim + [Cell(c, mp, seed) for seed in seeds for c, mp in pairs]))


def study_cells(grid: dict[str, Any], name: str, seeds: list[int], claim_seeds: list[int] | None = None) -> list[Cell]:
    """The cells of one of grid.yaml's `studies` (sets of cells beside the grid): every `conditioning` with every
    `mp`, or the (conditioning, mp) `pairs` it lists, at every seed (`seeds: claim`: at the profile's claim seeds;
    `seeds: [0, 1, …]`: at those), each seed's cells together."""
    studies = grid.get("studies", {})
    check_choice("--group", name, studies)
    study = studies[name]
    pairs = [tuple(p) for p in study["pairs"]] if "pairs" in study else [(c, mp) for c in study["conditioning"] for mp in study["mp"]]
    at = study["seeds"] if isinstance(study.get("seeds"), list) else (claim_seeds or seeds) if study.get("seeds") == "claim" else seeds
    return [Cell(c, mp, seed) for seed in at for c, mp in pairs]


def validate_grid(cells: list[Cell]) -> None:
    """Refuse a bad grid before any cell trains: every name must build."""
    from lit_mpdit.conditioning import Conditioning
    from lit_mpdit.config import grid_flags

    for cell in cells:
        Conditioning.parse(cell.conditioning)
        grid_flags(cell.conditioning, cell.mp)


def grid_flags_of(cell_id: str):
    """The design flags of the model a cell id names (its family chooses the optimizer preset)."""
    from lit_mpdit.config import grid_flags

    cell = Cell.from_id(cell_id)
    return grid_flags(cell.conditioning, cell.mp)


def buildable(cell_id: str) -> bool:
    """Whether a cell id names a model that builds (a strategy with a rung, or with a branch that builds it)."""
    try:
        cell = Cell.from_id(cell_id)
        validate_grid([cell])
        return cell.id == cell_id
    except (ConfigError, ValueError):
        return False


def check_data(profile: dict[str, Any]) -> None:
    """Build the profile's data module and fetch its files once, before any cell: a missing or truncated
    dataset, or no reference images for FID, is refused here with the data module's message, not inside
    every cell's trial (retried, failed)."""
    from lit_mpdit.data import instantiate_datamodule

    spec = profile["fit"]["data"]
    data = instantiate_datamodule(spec["class_path"], spec.get("init_args", {}), "profile fit.data")
    data.prepare_data()
    data.check_reference(profile["eval"]["reference_split"])


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Atomically: a reader (or a rerun after a kill) sees the old file or the new one, never half."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# One cell.


def cell_config(profile: dict[str, Any], cell: Cell, cell_dir: Path, lr: float | None, run_id: str | None, tracking_uri: str) -> dict[str, Any]:
    """The LightningCLI configuration of one cell: the profile's, the cell's choices, and where to write."""
    loggers: list[dict[str, Any]] = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(cell_dir), "name": "", "version": ""}},
    ]
    if run_id is not None:
        loggers.append(
            {"class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": {"tracking_uri": tracking_uri, "run_id": run_id}}
        )
    ema_decay = profile.get("ema_decay", 0.999)
    from lit_mpdit.config import grid_design, grid_flags, split_overrides

    if lr is None:  # a profile may set a learning rate per family instead of the family's preset, and per paper model
        rates = profile.get("lr", {})  # (its rung-axis value, e.g. morph/A) in place of its family's
        lr = rates.get(split_overrides(cell.mp)[0], rates.get(grid_flags(cell.conditioning, cell.mp).family))
    overrides = {
        "seed_everything": cell.seed,
        "model": {**grid_design(cell.conditioning, cell.mp), **({"lr": lr} if lr is not None else {})},
        "trainer": {
            "default_root_dir": str(cell_dir),
            "logger": loggers,
            "enable_progress_bar": sys.stdout.isatty(),  # a bar on a terminal, plain lines in a log
            "enable_model_summary": False,  # a table per cell in the sweep's log; result.json holds the parameter count
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.EMAWeightAveraging",
                    # A fixed-decay EMA started at step 0 keeps a share decay^steps of the random
                    # initialisation: short runs start it later.
                    "init_args": {"decay": ema_decay, "update_starting_at_step": profile.get("ema_start", 0)},
                },
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(cell_dir / "checkpoints"), "save_last": True, "every_n_train_steps": profile.get("checkpoint_every", 100), "save_top_k": 0},
                },
                {"class_path": "lit_mpdit.callbacks.Throughput"},
                {"class_path": "lit_mpdit.callbacks.MagnitudeDiagnostics", "init_args": {"every_n_steps": profile.get("diagnostics_every", 50)}},
                {"class_path": "lit_mpdit.callbacks.SampleGrid", "init_args": {"every_n_steps": profile.get("grid_every", 0)}},
                *posthoc_ema(profile, cell_dir),
                *fid_curve(profile),
            ],
        },
    }
    return deep_merge(profile["fit"], overrides)


def posthoc_ema(profile: dict[str, Any], cell_dir: Path) -> list[dict[str, Any]]:
    """EDM2's power EMAs with snapshots beside the checkpoints, when the profile evaluates post-hoc EMA weights."""
    if profile["eval"].get("weights") != "posthoc":
        return []
    every = profile.get("checkpoint_every", 100)  # a resumed cell rewrites the snapshots after its checkpoint
    return [{"class_path": "lit_mpdit.ema.PowerEMA", "init_args": {"snapshot_every": every, "snapshot_dir": str(cell_dir / "ema_snapshots")}}]


def fid_curve(profile: dict[str, Any]) -> list[dict[str, Any]]:
    """FID at several points of the run (`fid_curve: {every: steps, n_fake: N}`), with the profile's protocol
    on the weights it evaluates (EMA where it evaluates EMA), logged as val/fid: the convergence curves."""
    curve = profile.get("fid_curve")
    if not curve:
        return []
    ev = profile["eval"]
    same = {k: ev[k] for k in ("n_ref", "reference_split", "steps", "sampler", "guidance", "precision", "sample_precision", "compile") if k in ev}
    weights = "ema" if ev.get("weights") == "ema" else "current"
    # The run's last point is the final evaluation's first n_fake images (`run_cell`), not a second sampling.
    args = {"every_n_steps": curve["every"], "n_fake": curve_n(profile), "weights": weights, "bootstrap": 0, "skip_last": True, **same}
    return [{"class_path": "lit_mpdit.callbacks.PeriodicFID", "init_args": args}]


def curve_n(profile: dict[str, Any]) -> int | None:
    """The generated images per point of the profile's FID curve (None: no curve)."""
    curve = profile.get("fid_curve")
    return curve.get("n_fake", profile["eval"]["n_fake"]) if curve else None


def checkpoint_step(path: Path) -> int:
    from lit_mpdit.module import read_checkpoint

    return int(read_checkpoint(str(path), "checkpoint", mmap=True).get("global_step", 0))


def readable_checkpoint(path: Path) -> bool:
    from lit_mpdit.module import read_checkpoint

    try:
        read_checkpoint(str(path), "checkpoint", mmap=True)
        return True
    except ConfigError:
        return False


def run_cell(profile: dict[str, Any], cell: Cell, cell_dir: Path, *, lr: float | None = None, run_id: str | None = None, tracking_uri: str = "") -> dict[str, Any]:
    """Train (or resume) one cell and evaluate it; the result is also written to `cell_dir/result.json`."""
    from lit_mpdit.cli import lightning_cli
    from lit_mpdit.cost import forward_gflops, n_params
    from lit_mpdit.data import reference_name
    from lit_mpdit.evaluate import Protocol, evaluate, load_for_evaluation

    result_path = cell_dir / "result.json"
    if result_path.exists():  # finished before an interruption: read back, never retrain
        return json.loads(result_path.read_text())
    cell_dir.mkdir(parents=True, exist_ok=True)
    import torch

    # The cells of a sweep share one process: without a reset, a compiled profile's cells would pile up guards
    # on the same code until dynamo's recompile limit sends the rest to eager. Kernels stay cached on disk.
    torch._dynamo.reset()
    cli = lightning_cli(args=cell_config(profile, cell, cell_dir, lr, run_id, tracking_uri), run=False)
    last = cell_dir / "checkpoints" / "last.ckpt"
    if last.exists() and not readable_checkpoint(last):  # killed while writing it: start the cell again
        os.replace(last, last.with_suffix(".ckpt.corrupt"))
    started = time.time()
    resumed_from = checkpoint_step(last) if last.exists() else 0
    resume = f", resuming from {last} (step {resumed_from})" if resumed_from else ""
    print(f"[sweep] {cell.id}: training {cli.trainer.max_steps} steps{resume}", flush=True)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last.exists() else None)
    protocol = Protocol(**profile["eval"], seed=cell.seed)
    # The weights the protocol names, read from the final checkpoint: a rerun after a kill during evaluation
    # restores a finished fit, which skips the hook that swaps the EMA in, so the live module cannot be trusted.
    module = load_for_evaluation(str(last), protocol, snapshots=str(cell_dir / "ema_snapshots"))
    data = cli.datamodule
    reference = reference_name(data, protocol.reference_split)
    n_curve = curve_n(profile)
    subsets = (n_curve,) if n_curve else ()
    evaluation = evaluate(module, reference, lambda: data.reference_images(protocol.reference_split, protocol.n_ref), protocol, data.to_images, subsets)
    callbacks = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    throughput, wall = callbacks["Throughput"], time.time() - started
    # Where this process's wall time went (a resumed cell: since the resume). Training steps are the budget;
    # the rest (evaluation, checkpoints, start-up, diagnostics) is overhead.
    seconds = {
        "training_steps": throughput.seconds,
        "fid_curve": callbacks["PeriodicFID"].seconds if "PeriodicFID" in callbacks else 0.0,
        "final_evaluation": evaluation["seconds"]["total"],
        # Paid once per machine or process, not per cell: the reference features on a cache miss, a first compile.
        "one_time": evaluation["seconds"]["reference"] + getattr(callbacks.get("PeriodicFID"), "reference_seconds", 0.0) + throughput.warmup_excess,
        "wall": wall,
    }
    record = {
        "cell": cell.id,
        **asdict(cell),
        "status": "complete",
        **{k: evaluation[k] for k in ("fid", "fid_lo", "fid_hi")},
        "params": n_params(module.net),
        "gflops": forward_gflops(module.net),
        "train_images_per_s": throughput.images_per_second,
        "steps": cli.trainer.global_step,
        "wall_s": wall,
        "one_time_s": seconds["one_time"],
        # A resumed cell's process saw only part of its training: no share of the whole can be given.
        "overhead_fraction": None if resumed_from else 1 - seconds["training_steps"] / wall,
        "resumed_from_step": resumed_from,
        "seconds": seconds,
        "lr": module.preset().lr,
        "train_precision": str(cli.trainer.precision),
        "protocol": evaluation["protocol"],
    }
    if n_curve:
        record["fid_curve_final"] = {"step": cli.trainer.global_step, "n_fake": n_curve, "fid": evaluation["fid_subsets"][n_curve]}
    write_json(result_path, record)
    print(f"[sweep] {cell.id}: FID {record['fid']:.2f} [{record['fid_lo']:.2f}, {record['fid_hi']:.2f}], {record['wall_s']:.0f} s", flush=True)
    return record
