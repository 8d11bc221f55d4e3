"""The learning-rate search behind a profile's `lr`: a log grid per family on the claim cells, at the profile's
budget, one seed, each learning rate a sweep of its own (so a rerun resumes it).

    python -m ablations.lr_search --profile cpu          # results/ablations/lr_search/cpu/: lr_table.md and the runs
    python -m ablations.lr_search --profile cpu --table  # the table of the cells finished so far, no training
    python -m ablations.lr_search --profile cpu --search paper   # the paper's own models: results/ablations/lr_search/cpu_paper/
    mlflow ui --backend-store-uri sqlite:///results/ablations/lr_search/cpu/mlflow.db   # every rate's runs

The grid is the profile's `lr_search: {standard: [...], mp: [...], cells: [...]}` (`lr_search_<name>` with
--search <name>). The table gives FID per (cell, learning rate); the profile's `lr` then names the best of each
family, with a comment naming this search.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from lit_mpdit.errors import ConfigError


def lr_folder(out: Path, lr: float) -> Path:
    """`lr1e-03`, `lr1.6e-02`: the fewest digits that name the rate exactly, so no two rates share a folder."""
    digits = next(d for d in range(17) if float(f"{lr:.{d}e}") == lr)
    return out / f"lr{lr:.{digits}e}"


def lr_table(out: Path) -> pd.DataFrame:
    """One row per finished (cell, learning rate) under `out`, by cell and learning rate. `best_for_cell` marks
    the lowest FID of each cell; `best_at_edge` says that best is the smallest or largest rate searched, so
    the optimum may lie outside the grid and the search should be widened before its choice is trusted."""
    from ablations.cells import load_yaml

    columns = ["cell", "lr", "fid", "fid_lo", "fid_hi", "status", "steps", "wall_s", "precision"]
    rows = []
    for result in sorted(out.glob("lr*/cells/*/result.json")):
        record = json.loads(result.read_text())
        config = result.parent / "config.yaml"  # what the cell trained with, as Lightning saved it
        record["precision"] = str(load_yaml(config)["trainer"]["precision"]) if config.exists() else None
        rows.append({k: record.get(k) for k in columns})
    table = pd.DataFrame(rows, columns=columns)
    table["best_for_cell"] = table.fid == table.groupby("cell").fid.transform("min")
    lowest, highest = table.groupby("cell").lr.transform("min"), table.groupby("cell").lr.transform("max")
    table["best_at_edge"] = table.best_for_cell & ((table.lr == lowest) | (table.lr == highest))
    return table.sort_values(["cell", "lr"]).reset_index(drop=True)


def search_spec(profile_name: str, name: str | None) -> dict:
    """The profile's learning-rate grid `lr_search` (or `lr_search_<name>`), refused before any work if absent."""
    from ablations.cells import load_profile
    from lit_mpdit.errors import check_choice

    profile = load_profile(profile_name)
    key = f"lr_search_{name}" if name else "lr_search"
    if name:
        check_choice("--search", name, [k.removeprefix("lr_search_") for k in profile if k.startswith("lr_search_")])
    if not profile.get(key):
        raise ConfigError(f"--profile: {profile_name} has no lr_search grid; allowed: profiles with lr_search")
    return profile[key]


def search(profile_name: str, out: Path, name: str | None = None) -> pd.DataFrame:
    import time

    from ablations.cells import grid_flags_of, load_profile, precisions_of
    from ablations.sweep import sweep

    spec = search_spec(profile_name, name)
    precision = precisions_of(load_profile(profile_name))["train"]
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"  # one MLflow store for the search: every rate's runs side by side
    runs = [(cell, lr) for cell in spec["cells"] for lr in spec[grid_flags_of(cell).family]]
    started, before = time.time(), finished_runs(out, runs)
    for cell, lr in runs:  # one progress line per run to train; a finished run's sweep only rebuilds its tables
        if (cell, lr) not in finished_runs(out, [(cell, lr)]):
            print(progress(out, runs, before, started, precision), flush=True)
        sweep(profile_name, lr_folder(out, lr), None, tracking_uri, "grid", None, [cell], lr, progress=False)
    print(progress(out, runs, before, started, precision), flush=True)
    return write_table(profile_name, out, name)


def finished_runs(out: Path, runs: list[tuple[str, float]]) -> dict[tuple[str, float], dict]:
    """The search's finished (cell, learning rate) runs under `out`, each with its result.json."""
    paths = {run: lr_folder(out, run[1]) / "cells" / run[0] / "result.json" for run in runs}
    return {run: json.loads(path.read_text()) for run, path in paths.items() if path.exists()}


def progress(out: Path, runs: list[tuple[str, float]], before: dict, started: float, precision: str) -> str:
    """The search's progress line over its sweeps ('[lr search] 3/12 cells finished (1 this run), …, ETA 85 min'):
    each rate is a sweep of one cell, whose own line cannot see the rest. The ETA takes the median of the cells this
    run finished, or else of those an earlier run left in `out` trained in this run's `precision` ("~")."""
    from ablations.sweep import median_pace, progress_line

    done = finished_runs(out, runs)
    fresh = [r for run, r in done.items() if run not in before]
    pace = median_pace(fresh)
    return progress_line(
        len(done), len(runs), 0, len(fresh), started, [pace] if pace else [], median_pace(before.values(), precision),
        label="lr search", committed_source=f"earlier runs' pace in {precision}",
    )


def write_table(profile_name: str, out: Path, name: str | None = None) -> pd.DataFrame:
    """lr_table.csv and lr_table.md of the finished cells under `out` (all of them, or so far)."""
    if not any(out.glob("lr*/cells/*/result.json")):
        raise ConfigError(f"--out: no finished learning-rate cell in {out}; allowed: the folder of a search (python -m ablations.lr_search --profile {profile_name})")
    from ablations.artifacts import relocate_artifacts

    relocate_artifacts(out)  # a clone's copy of the search: its MLflow runs find their artifacts here
    table = lr_table(out)
    table.to_csv(out / "lr_table.csv", index=False)
    command = f"python -m ablations.lr_search --profile {profile_name}" + (f" --search {name}" if name else "")
    (out / "lr_table.md").write_text(
        f"# Learning-rate search of profile `{profile_name}`{f' ({name})' if name else ''}\n\n`{command}`: "
        "one seed per (cell, learning rate), FID with the profile's protocol.\n\n" + table.to_markdown(index=False, floatfmt=".4g") + "\n"
    )
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ablations.lr_search", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--search", default=None, help="the profile's lr_search_<name> grid (e.g. paper) instead of its lr_search")
    p.add_argument("--out", default=None, help="default: results/ablations/lr_search/<profile>[_<search>]")
    p.add_argument("--table", action="store_true", help="only write the table of the cells finished so far")
    args = p.parse_args(argv)
    out = Path(args.out or f"results/ablations/lr_search/{args.profile}" + (f"_{args.search}" if args.search else ""))
    try:
        table = write_table(args.profile, out, args.search) if args.table else search(args.profile, out, args.search)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(table.to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
