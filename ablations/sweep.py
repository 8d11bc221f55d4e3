"""The ablation sweep: an Optuna study over the grid of `grid.yaml` at a scale of `profiles.yaml`.

    python -m ablations.sweep --profile cpu            # the default of `make ablations`
    python -m ablations.sweep --profile smoke --out /tmp/smoke

Each trial is one cell (conditioning × rung × seed), trained through LightningCLI, evaluated with
FID, and tracked as an MLflow run nested under the sweep's run. The study lives in a relational
storage (SQLite under the output folder by default, or any URL, e.g. PostgreSQL, for many
workers). A rerun resumes: finished cells are read back, an interrupted cell continues from its
last checkpoint. Tables and plots are written by `ablations.report` at the end.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ablations.artifacts import local_store, relocate_artifacts
from ablations.cells import (
    HERE,
    Cell,
    buildable,
    check_data,
    grid_cells,
    load_profile,
    load_yaml,
    precisions_of,
    run_cell,
    study_cells,
    validate_grid,
    write_json,
)
from lit_mpdit.errors import ConfigError, check_choice, check_writable
from lit_mpdit.runtime import keep_freed_memory

MODES = ("grid", "tpe")


# ----------------------------------------------------------------------------
# The study.

FAILED_FOR_GOOD = "non_finite_loss"  # a deterministic failure: reported in the tables, not retried
MAX_ATTEMPTS = 3  # a cell whose trials raised this often is reported as failed, not retried forever
RAISED = "error"  # set on a trial that raised; a trial failed without it was a killed worker's


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an inter-process lock on `path` (POSIX flock; released if the process dies)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Loggers whose information a sweep's log leaves out: errors and warnings still show.
QUIET_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",  # GPU and TPU available, the litlogger tip, `Trainer.fit` stopped, AMP used
    "mlflow.store.db.utils",  # the store's tables created or upgraded
    "mlflow.system_metrics",  # the system-metrics monitor started and stopped
    "optuna",  # a study created, each trial finished (the cell's [sweep] line gives its FID); a failed trial warns
)


@contextmanager
def quiet_log() -> Iterator[None]:
    """The sweep's output without the libraries' known, harmless lines: one line per cell start and end, and the
    grid's progress (issue 27: each cell printed a dozen more). Errors, and warnings not named here, still show."""
    from optuna.exceptions import ExperimentalWarning

    harmless = (
        # Optuna's heartbeats (a killed worker's cell queued again: `storage_for`), experimental since v2.8 and v2.9
        (ExperimentalWarning, r"RetryHeartbeatStaleTrialCallback is experimental"),
        (ExperimentalWarning, r"Argument ``heartbeat_interval`` is an experimental feature"),
        (ExperimentalWarning, r"optuna\.storages\._heartbeat\.fail_stale_trials is experimental"),
        # Lightning's pytree helper builds torch's deprecated LeafSpec (torch 2.13, every fit)
        (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
        # a cell started afresh where a killed run left no checkpoint: its CSV logger replaces that run's metrics
        (UserWarning, r"Experiment logs directory .* exists and is not empty"),
    )
    from lit_mpdit.runtime import quiet_loggers

    with warnings.catch_warnings(), quiet_loggers(*QUIET_LOGGERS):
        for category, message in harmless:
            warnings.filterwarnings("ignore", message, category)
        yield


def storage_for(url: str):
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    # Heartbeats mark the trials of dead workers stale; the callback requeues them (a killed cell
    # then resumes from its checkpoint).
    return RDBStorage(
        url,
        engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
        heartbeat_interval=10,
        grace_period=30,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
    )


def cell_grid(cells: list[str]):
    """Optuna's grid sampler over the cells, without its end-of-grid check: `run_grid` decides when the grid
    is done, and Optuna's check fails (KeyError 'grid_id') after a trial of a cell queued again."""
    import optuna

    class CellGrid(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return CellGrid({"cell": cells}, seed=0)


def claimed_elsewhere(trial, cell_id: str) -> bool:
    """Whether another running trial holds this cell. Both trials of a simultaneous pick yield (and
    the cell is queued again), so two workers never train one cell at the same time."""
    from optuna.trial import TrialState

    return any(
        t.number != trial.number and t.state == TrialState.RUNNING and t.params.get("cell") == cell_id
        for t in trial.study.get_trials(deepcopy=False)
    )


def make_objective(profile, out: Path, tracking_uri: str, tpe_space: dict | None, fixed_lr: float | None = None):
    import mlflow
    import optuna

    def objective(trial: optuna.Trial) -> float:
        try:
            with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True) as run:
                trial.set_user_attr("mlflow_run_id", run.info.run_id)
                return train_and_track(trial, run)
        except optuna.TrialPruned:
            raise
        except Exception as e:
            trial.set_user_attr(RAISED, f"{type(e).__name__}: {e}"[:1000])
            raise

    def train_and_track(trial: optuna.Trial, run) -> float:
        from lit_mpdit.module import NonFiniteLossError

        cell = Cell.from_id(trial.suggest_categorical("cell", trial.study.user_attrs["cells"]))
        if claimed_elsewhere(trial, cell.id):
            raise optuna.TrialPruned(f"{cell.id} is being trained by another trial")
        lr = fixed_lr
        if tpe_space is not None:
            from lit_mpdit.config import grid_flags

            low, high = tpe_space[grid_flags(cell.conditioning, cell.mp).family]
            lr = trial.suggest_float("lr", low, high, log=True)
        mlflow.set_tag("mlflow.runName", cell.id if lr is None else f"{cell.id}-lr{lr:.2e}")
        # cell_*, not seed, mp, conditioning: Lightning logs the module's and data module's hyper-parameters into this
        # run too (the data's `seed`, the same for every cell; a variant cell's mp None; a changed flag's rung), and
        # MLflow refuses a param logged twice with two values
        mlflow.log_params({"cell": cell.id, "cell_conditioning": cell.conditioning, "cell_mp": cell.mp, "cell_seed": cell.seed, "trial": trial.number})
        if lr is not None:
            mlflow.log_param("lr", lr)
        cell_dir = out / "cells" / (cell.id if tpe_space is None else f"{cell.id}-t{trial.number}")
        try:
            record = run_cell(profile, cell, cell_dir, lr=lr, run_id=run.info.run_id, tracking_uri=tracking_uri)
        except NonFiniteLossError as e:
            record = {"cell": cell.id, **asdict(cell), "status": "failed", "reason": str(e)}
            write_json(cell_dir / "result.json", record)
            print(f"[sweep] {cell.id}: failed, not retried: {e}", flush=True)
        if record["status"] == "failed":  # now or in an earlier attempt: the tables show the reason
            trial.set_user_attr(FAILED_FOR_GOOD, record["reason"])
            raise NonFiniteLossError(record["reason"])
        for key, value in record.items():
            if not isinstance(value, dict):
                trial.set_user_attr(key, value)
        mlflow.log_metrics({k: record[k] for k in ("fid", "fid_lo", "fid_hi", "params", "gflops", "train_images_per_s") if record.get(k) is not None})
        if "fid_curve_final" in record:  # the curve's last point, from the final evaluation's images
            mlflow.log_metric("val/fid", record["fid_curve_final"]["fid"], step=record["fid_curve_final"]["step"])
        mlflow.log_dict(record, "result.json")
        return record["fid"]

    return objective


def trial_cell(trial) -> str:
    """The cell a trial trains: its parameter, or for a queued trial not yet started, the one queued."""
    return trial.params.get("cell") or trial.system_attrs.get("fixed_params", {}).get("cell")


def crashed_cells(study) -> dict[str, str]:
    """Cells whose trials raised `MAX_ATTEMPTS` times (and never completed): what the last one raised."""
    from optuna.trial import TrialState

    raised: dict[str, list[str]] = {}
    done: set[str] = set()
    for t in study.get_trials(deepcopy=False):
        cell = trial_cell(t)
        if t.state == TrialState.COMPLETE or FAILED_FOR_GOOD in t.user_attrs:
            done.add(cell)
        elif t.state == TrialState.FAIL and RAISED in t.user_attrs:
            raised.setdefault(cell, []).append(t.user_attrs[RAISED])
    return {c: f"raised {len(e)} times, last: {e[-1]}" for c, e in raised.items() if len(e) >= MAX_ATTEMPTS and c not in done}


def cell_states(study) -> dict[str, set[str]]:
    """Cells by the states of their trials: finished (complete, failed for good, or raised `MAX_ATTEMPTS` times),
    running, queued. A killed worker's trial (failed by the heartbeat, never raised) does not count against its
    cell: a sweep killed any number of times finishes every cell when run again."""
    from optuna.trial import TrialState

    states: dict[str, set[str]] = {"finished": set(crashed_cells(study)), "running": set(), "queued": set()}
    for t in study.get_trials(deepcopy=False):
        cell = trial_cell(t)
        if t.state == TrialState.COMPLETE or FAILED_FOR_GOOD in t.user_attrs:
            states["finished"].add(cell)
        elif t.state == TrialState.RUNNING:
            states["running"].add(cell)
        elif t.state == TrialState.WAITING:
            states["queued"].add(cell)
    return states


def progress_line(
    done: int, total: int, running: int, done_here: int, started: float, walls: list[float], committed: float | None = None,
    label: str = "grid", committed_source: str = "committed run's pace",
) -> str:
    """'[grid] 5/21 cells finished (2 this run), 1 running, 31.2 min elapsed, ETA 98 min'.

    The ETA counts each cell left at the median time of the cells this run finished (`walls`: each one's wall
    time less what it paid once for the machine or the process, `cell_walls`): the cpu grid's first cell took
    864 s where the others took 375-484 s, for torch.compile's first compile and the FID reference features.
    Until a cell has finished, the committed run's median (`committed`) stands in, marked "~"; without it the ETA
    is unknown. The cells left are shared by the workers, this one and one per running cell. Under ten minutes
    it is given to a tenth of a minute. `label` and `committed_source` name the loop (a learning-rate search
    prints its own line over its sweeps, `lr_search.progress`) and where its stand-in pace comes from."""
    elapsed = (time.time() - started) / 60
    head = f"[{label}] {done}/{total} cells finished ({done_here} this run), {running} running, {elapsed:.1f} min elapsed"
    if done == total:
        return f"{head}, done"
    if walls:
        pace, mark, source = statistics.median(walls), "", ""
    elif committed:
        pace, mark, source = committed, "~", f" ({committed_source})"
    else:
        return f"{head}, ETA unknown"
    minutes = (total - done) * pace / (running + 1) / 60
    return f"{head}, ETA {mark}{minutes:.{1 if minutes < 10 else 0}f} min{source}"


def cell_walls(study, first_trial: int) -> list[float]:
    """What each cell completed by this run's trials (number `first_trial` on, on any worker) took that the next
    cell will take again: result.json's `wall_s` less its `one_time_s` (the reference features on a cache miss,
    the steps' excess over the measured pace while torch.compile first compiles); a resumed cell's, which covers
    only its last part, left out."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [recurring_s(t.user_attrs) for t in trials if t.number >= first_trial and "wall_s" in t.user_attrs and not t.user_attrs.get("resumed_from_step")]


def recurring_s(record: dict) -> float:
    """A finished cell's wall time less what it paid once (`one_time_s`, where recorded)."""
    return record["wall_s"] - record.get("one_time_s", 0.0)


def committed_pace(profile: str, precision: str) -> float | None:
    """The median time per cell of the committed run of `profile` (results/ablations/<profile>), if any, over
    its cells trained in `precision` (this run's: a machine where bf16 does not pay trains in fp32, at another
    pace), with one-time costs left out as `cell_walls` does (where recorded)."""
    records = [json.loads(p.read_text()) for p in (HERE.parent / "results" / "ablations" / profile / "cells").glob("*/result.json")]
    return median_pace(records, precision)


def median_pace(records, precision: str | None = None) -> float | None:
    """The median recurring time (`recurring_s`) of finished cells' records, those trained in `precision` if
    given; a resumed cell's, which covers only its last part, left out. None without any."""
    walls = [
        recurring_s(r) for r in records
        if r.get("wall_s") is not None and not r.get("resumed_from_step") and precision in (None, r.get("train_precision"))
    ]
    return statistics.median(walls) if walls else None


def run_grid(
    study, objective, cells: list[str], started: float | None = None, committed: float | None = None, progress: bool = True,
) -> None:
    """Run grid points in the order of `cells` until every cell is finished, here or by other workers on the same
    storage, printing one progress line (cells finished, elapsed time, ETA) per cell unless `progress` is False (a
    loop over sweeps that prints its own, `lr_search.search`); `committed`: the committed run's wall time per cell
    (`progress_line`).

    Optuna's grid counts a failed or pruned trial as done, so cells whose trials crashed (or were
    found stale by the heartbeat) are queued again; cells running elsewhere are waited for.
    """
    import optuna

    started = time.time() if started is None else started
    first_trial = len(study.get_trials(deepcopy=False))
    finished_before = None
    while True:
        optuna.storages.fail_stale_trials(study)
        states = cell_states(study)
        todo = [c for c in cells if c not in states["finished"]]
        done = len(cells) - len(todo)
        finished_before = done if finished_before is None else finished_before
        walls = cell_walls(study, first_trial)
        if progress:
            print(progress_line(done, len(cells), len(states["running"]), done - finished_before, started, walls, committed), flush=True)
        if not todo:
            return
        idle = [c for c in todo if c not in states["running"] | states["queued"]]
        if idle and not states["queued"]:  # the grid's order, not the sampler's shuffle: a grid cut short holds its
            study.enqueue_trial({"cell": idle[0]}, skip_if_exists=False)  # first cells (and crashed ones go again)
        if idle or states["queued"]:
            study.optimize(objective, n_trials=1, catch=(Exception,))
            last = study.get_trials(deepcopy=False)[-1]
            if "cell" not in last.params and RAISED in last.user_attrs:  # it raised before choosing a cell: every retry would too
                raise RuntimeError(f"a trial raised before choosing its cell: {last.user_attrs[RAISED]}")
        else:
            time.sleep(5)  # every open cell is being trained by another worker


def make_out(out: Path) -> None:
    """Create the sweep folder and prove it writable, or raise `ConfigError` naming `--out`."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # a private name: workers started together probe at once
            pass
    except OSError as e:
        raise ConfigError(f"--out: cannot write to {out} ({e.strerror})") from None


DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql")  # what SQLAlchemy-backed stores (Optuna's, MLflow's) speak
TRACKING_SCHEMES = (*DATABASE_SCHEMES, "file", "http", "https", "databricks")
CONNECT_TIMEOUT_S = 10


def check_database(url: str, option: str) -> None:
    """A database URL that parses, has a driver, and answers within CONNECT_TIMEOUT_S (SQLite: whose folder can be
    written), or `ConfigError` naming `option`: a bad store is refused before the sweep writes its first file."""
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except ArgumentError:
        raise ConfigError(f"{option}: {url!r} is not a database URL; allowed: {', '.join(f'{s}://...' for s in DATABASE_SCHEMES)}") from None
    check_choice(f"{option} scheme", parsed.get_backend_name(), DATABASE_SCHEMES)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database not in (None, "", ":memory:"):
            check_writable(Path(parsed.database).parent, option)
        return
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    except (NoSuchModuleError, ModuleNotFoundError) as e:
        raise ConfigError(f"{option}: no driver for {parsed.drivername} ({e}); e.g. pip install 'psycopg[binary]' for PostgreSQL") from None
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as e:
        reason = str(getattr(e, "orig", e)).strip().splitlines()[0]
        raise ConfigError(f"{option}: cannot connect to {parsed.render_as_string(hide_password=True)}: {reason}") from None
    finally:
        engine.dispose()


def check_stores(storage_url: str | None, tracking_uri: str | None) -> None:
    """The sweep's Optuna storage and MLflow tracking URI, when given, checked before any work (the defaults are
    SQLite files in the output folder, which `make_out` proves writable)."""
    if storage_url:
        check_database(storage_url, "--storage")
    if tracking_uri:
        scheme = tracking_uri.split("://", 1)[0] if "://" in tracking_uri else "file"
        check_choice("--tracking-uri scheme", scheme.split("+", 1)[0], TRACKING_SCHEMES)
        if scheme.split("+", 1)[0] in DATABASE_SCHEMES:
            check_database(tracking_uri, "--tracking-uri")


@quiet_log()
def sweep(
    profile_name: str,
    out: Path,
    storage_url: str | None,
    tracking_uri: str | None,
    mode: str,
    n_trials: int | None,
    cells_filter: list[str] | None,
    lr: float | None = None,  # every cell's learning rate, in place of the profile's (a learning-rate grid)
    group: str | None = None,  # a study of grid.yaml (`studies`) in place of the grid
    progress: bool = True,  # False: no progress lines, for a loop over sweeps that prints its own (`run_grid`)
) -> Path:
    import mlflow
    import optuna

    from lit_mpdit.config import GRID_MP_VALUES

    profile = load_profile(profile_name)
    check_choice("--mode", mode, MODES)
    if lr is not None and (lr <= 0 or mode != "grid"):
        raise ConfigError(f"--lr: a positive learning rate for --mode grid, got {lr} with --mode {mode}")
    if n_trials is not None and (mode != "tpe" or n_trials < 1):
        raise ConfigError(f"--n-trials: a positive number of trials for --mode tpe, got {n_trials} with --mode {mode}")
    grid = load_yaml(HERE / "grid.yaml")
    cells = grid_cells(grid, profile["seeds"], profile.get("claim_seeds")) if group is None else study_cells(grid, group, profile["seeds"], profile.get("claim_seeds"))
    if cells_filter:  # the grid's cells, or any other cell whose model builds (e.g. a branch of the paper's code)
        grid_ids = {c.id for c in cells}
        unknown = sorted(c for c in set(cells_filter) - grid_ids if not buildable(c))
        if unknown:
            raise ConfigError(
                f"--cells: unknown cells {unknown}; allowed: {', '.join(c.id for c in cells)}, or "
                f"<conditioning>-<rung or branch: {', '.join(GRID_MP_VALUES)}>-s<seed>"
            )
        cells = [c for c in cells if c.id in cells_filter] + [Cell.from_id(c) for c in dict.fromkeys(cells_filter) if c not in grid_ids]
    validate_grid(cells)
    check_data(profile)
    check_stores(storage_url, tracking_uri)
    make_out(out)

    storage_url = storage_url or f"sqlite:///{out / 'optuna.db'}"
    # Not $MLFLOW_TRACKING_URI here: mlflow.set_tracking_uri writes it, so a second sweep in one process (a
    # learning-rate search) would log into the first one's store. main() reads it, before any sweep.
    tracking_uri = tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    ids = [c.id for c in cells]
    tpe_space = load_yaml(HERE / "profiles.yaml")["tpe"]["lr"] if mode == "tpe" else None
    sampler = cell_grid(ids) if mode == "grid" else optuna.samplers.TPESampler(seed=0)
    study_name = f"lit_mpdit-{profile_name}" + ("" if mode == "grid" else "-tpe")
    study = open_stores(out, study_name, storage_url, tracking_uri, sampler, ids, precisions_of(profile))
    objective = make_objective(profile, out, tracking_uri, tpe_space, lr)
    from ablations.report import write_report

    baseline = load_yaml(HERE / "grid.yaml")["baseline"]
    if mode == "grid" and cell_states(study)["finished"] >= set(ids):  # e.g. the committed results of a clone
        if progress:
            print(f"[sweep] all {len(ids)} cells finished in an earlier run: rebuilding the tables (--out elsewhere trains afresh)", flush=True)
        return write_report(study, out, profile_name, baseline, crashed_cells(study))  # the stores and sweep_run.json stay as that run left them
    started = time.time()
    with mlflow.start_run(run_name=f"sweep-{profile_name}", log_system_metrics=True):
        mlflow.log_params({"profile": profile_name, "mode": mode, "cells": len(ids)})
        mlflow.log_dict(profile, "profile.json")
        if mode == "grid":
            run_grid(study, objective, ids, started, committed_pace(profile_name, precisions_of(profile)["train"]), progress)
        else:
            study.optimize(objective, n_trials=n_trials or 8, catch=(Exception,))
        crashed = crashed_cells(study)
        report_dir = write_report(study, out, profile_name, baseline, crashed)
        write_json(out / "sweep_run.json", {**run_info(profile_name, mode, started), "crashed": crashed})
        for path in sorted(report_dir.iterdir()):  # the tables and plots, not the cells' checkpoints
            if path.suffix in (".csv", ".md", ".tex", ".png", ".json"):
                mlflow.log_artifact(str(path), "report")
    return report_dir


def open_stores(out: Path, study_name: str, storage_url: str, tracking_uri: str, sampler, cells: list[str], precisions: dict[str, str] | None = None):
    """Create or load the Optuna study and the MLflow experiment, one worker at a time: workers started
    together would otherwise create the same SQLite schemas at once, and one of them would crash.

    The study keeps the cells and the `precisions` it was started with: a sweep resumed with other cells, or
    on a machine where the profile's "auto" precision resolves otherwise, is refused before any work."""
    import mlflow
    import optuna

    store = local_store(tracking_uri)
    with exclusive(out / ".init.lock"):
        if store is not None:
            relocate_artifacts(store)
        study = optuna.create_study(study_name=study_name, storage=storage_for(storage_url), sampler=sampler, direction="minimize", load_if_exists=True)
        before = study.user_attrs.get("cells")
        if before is not None and before != cells and study.get_trials(deepcopy=False):  # Optuna's choices cannot change
            raise ConfigError(f"--cells: {out} holds a sweep of the cells {', '.join(before)}; allowed: those cells, or another --out for {', '.join(cells)}")
        study.set_user_attr("cells", cells)
        pinned = study.user_attrs.get("precisions")
        training = not cell_states(study)["finished"] >= set(cells)  # a finished sweep is only read back
        if precisions is not None and pinned is not None and pinned != precisions and training:
            raise ConfigError(
                f"--out: {out} trains in {describe(pinned)} (its first cells did), but this machine would run {describe(precisions)} "
                "(the profile's precision `auto`: bf16 only where the CPU has it natively); allowed: resume it where it resolves the same, or another --out"
            )
        if precisions is not None and pinned is None and not study.get_trials(deepcopy=False):
            study.set_user_attr("precisions", precisions)
        mlflow.set_tracking_uri(tracking_uri)
        if mlflow.get_experiment_by_name(study_name) is None:  # artifacts beside the sweep, not in ./mlruns
            mlflow.create_experiment(study_name, artifact_location=((store or out) / "mlartifacts").resolve().as_uri())
        mlflow.set_experiment(study_name)
    return study


def describe(precisions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in precisions.items())


def run_info(profile: str, mode: str, started: float) -> dict[str, Any]:
    """When and where this invocation ran (a resumed sweep records only its own part)."""
    import platform

    import torch

    return {
        "profile": profile,
        "mode": mode,
        "command": " ".join(["python -m ablations.sweep", *sys.argv[1:]]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_minutes": round((time.time() - started) / 60, 1),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ablations.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="cpu", help="smoke, cpu (default) or paper")
    p.add_argument("--out", default=None, help="output folder (default: results/ablations/<profile>)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in the output folder)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite in the output folder)")
    p.add_argument("--mode", default="grid", help="grid (the ablation grid) or tpe (learning-rate search)")
    p.add_argument("--n-trials", type=int, default=None, help="trials of a tpe search")
    p.add_argument("--cells", default=None, help="comma-separated cell ids to run (default: all)")
    p.add_argument("--lr", type=float, default=None, help="every cell's peak learning rate (default: the profile's per family)")
    p.add_argument("--group", default=None, help="a study of grid.yaml (e.g. leave_one_out) instead of the grid; --out defaults to results/ablations/<group>")
    p.add_argument("--compare", default=None, help="a committed run of the same grid: end with a reproduction report against it")
    args = p.parse_args(argv)
    keep_freed_memory()
    try:
        if args.compare and not (Path(args.compare) / "fid_table.csv").exists():
            raise ConfigError(f"--compare: no finished sweep in {args.compare} (it has no fid_table.csv)")
        out = Path(args.out or f"results/ablations/{args.group or args.profile}")
        cells = args.cells.split(",") if args.cells else None
        tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        report = sweep(args.profile, out, args.storage, tracking_uri, args.mode, args.n_trials, cells, args.lr, args.group)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"[sweep] tables and plots in {report}")
    if args.compare and Path(args.compare).resolve() != report.resolve():
        from ablations.report import write_reproduction

        print(write_reproduction(report, Path(args.compare)))
    crashed = json.loads((report / "sweep_run.json").read_text())["crashed"]
    if crashed:  # a diverged cell is a result; a cell that kept raising is an error to look into
        print(f"error: {len(crashed)} cells raised {MAX_ATTEMPTS} times (in the tables as failed):", file=sys.stderr)
        for cell, reason in crashed.items():
            print(f"  {cell}: {reason}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
