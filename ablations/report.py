"""Tables and plots of a sweep, from the cells' results and logs (never from typed-in numbers).

    python -m ablations.report results/ablations/cpu     # rebuild the report of a finished sweep
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

from ablations.cells import HERE, Cell
from ablations.claims import t_quantile_975, write_claims
from ablations.leave_one_out import write_leave_one_out

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

RUNGS = "ABCDE"


def cell_of(cell_id: str) -> Cell:
    """The (conditioning, mp, seed) of a cell id."""
    return Cell.from_id(cell_id)


def load_results(out: Path, cells: list[str], crashed: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per grid cell: its result.json, or a row saying it failed (`crashed`: cell → reason) or has
    not finished."""
    rows = []
    for cell in cells:
        path = out / "cells" / cell / "result.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
        else:
            parsed = cell_of(cell)
            row = {"cell": cell, "conditioning": parsed.conditioning, "mp": parsed.mp, "seed": parsed.seed, "status": "missing"}
            if cell in (crashed or {}):
                row |= {"status": "failed", "reason": crashed[cell]}
            rows.append(row)
    return pd.DataFrame(rows)


def fid_table(results: pd.DataFrame, baseline: dict[str, str]) -> pd.DataFrame:
    """FID per (conditioning, rung): one seed → its bootstrap interval; several → the mean and a 95% t-interval
    over seeds, with the runs' mean bootstrap half-width beside it."""
    rows = []
    for (conditioning, mp), group in results.groupby(["conditioning", "mp"], sort=False):
        done = group[group.status == "complete"]
        row: dict[str, Any] = {"conditioning": conditioning, "mp": mp, "seeds": len(done)}
        if len(done) == 0:
            row |= {"fid": math.nan, "ci_low": math.nan, "ci_high": math.nan, "status": "; ".join(sorted(set(group.status)))}
            if "reason" in group:
                row["status"] += ": " + "; ".join(str(r)[:80] for r in group.reason.dropna())
        elif len(done) == 1:
            row |= {"fid": done.fid.iloc[0], "ci_low": done.fid_lo.iloc[0], "ci_high": done.fid_hi.iloc[0], "status": "complete"}
        else:
            mean, sem = done.fid.mean(), done.fid.std(ddof=1) / math.sqrt(len(done))
            half = t_quantile_975(len(done) - 1) * sem
            row |= {"fid": mean, "ci_low": mean - half, "ci_high": mean + half, "status": "complete"}
        if len(done):  # the sampling-only uncertainty of one run, beside the interval over seeds
            row["bootstrap_half_width"] = ((done.fid_hi - done.fid_lo) / 2).mean()
        rows.append(row)
    table = pd.DataFrame(rows)
    base = table[(table.conditioning == baseline["conditioning"]) & (table.mp == baseline["mp"])].fid
    base_fid = base.iloc[0] if len(base) else math.nan
    table["delta_pct"] = 100 * (table.fid - base_fid) / base_fid
    return table


def params_table(results: pd.DataFrame) -> pd.DataFrame:
    """Exact parameter counts with Δ% to adaln at the same rung, GFLOPs, training throughput and the share of a
    cell's wall time that was not training steps (evaluation, checkpoints, start-up)."""
    done = results[results.status == "complete"]
    if done.empty:  # every cell failed or is missing: an empty table, not a crash of the whole report
        return pd.DataFrame(columns=["conditioning", "mp", "params", "gflops", "train_images_per_s", "delta_pct_vs_adaln"])
    costs = {"params": ("params", "first"), "gflops": ("gflops", "first"), "train_images_per_s": ("train_images_per_s", "mean")}
    if "overhead_fraction" in done:  # the share of a cell's wall time not spent on training steps (unresumed cells)
        done = done.assign(overhead_pct=100 * done.overhead_fraction.astype(float))
        costs["overhead_pct"] = ("overhead_pct", "mean")
    table = done.groupby(["conditioning", "mp"], sort=False).agg(**costs).reset_index()
    adaln = table[table.conditioning == "adaln"].set_index("mp").params
    table["delta_pct_vs_adaln"] = [100 * (p - adaln[mp]) / adaln[mp] if mp in adaln else math.nan for p, mp in zip(table.params, table.mp)]
    return table


def write_table(table: pd.DataFrame, path: Path, floatfmt: str = ".2f") -> None:
    table.to_csv(path.with_suffix(".csv"), index=False)
    path.with_suffix(".md").write_text(table.to_markdown(index=False, floatfmt=floatfmt) + "\n")
    path.with_suffix(".tex").write_text(table.to_latex(index=False, float_format=lambda v: format(v, floatfmt), na_rep="--"))


# ----------------------------------------------------------------------------
# Plots.


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label(conditioning: str, mp: str) -> str:
    return f"{conditioning} / {mp}"


def plot_fid(table: pd.DataFrame, path: Path) -> None:
    t = table.dropna(subset=["fid"]).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(t) + 1.2))
    colors = ["tab:blue" if mp == "A" else "tab:orange" if mp == "E" else "tab:gray" for mp in t.mp]
    ax.barh(range(len(t)), t.fid, color=colors, alpha=0.7)
    ax.errorbar(t.fid, range(len(t)), xerr=[t.fid - t.ci_low, t.ci_high - t.fid], fmt="none", ecolor="black", capsize=3)
    ax.set_yticks(range(len(t)), [label(c, m) for c, m in zip(t.conditioning, t.mp)])
    ax.invert_yaxis()
    ax.set_xlabel("FID (lower is better), 95% interval")
    ax.set_title("FID per cell (blue: rung A, orange: rung E)")
    save(fig, path)


def plot_fid_vs_params(fids: pd.DataFrame, params: pd.DataFrame, path: Path) -> None:
    t = fids.merge(params, on=["conditioning", "mp"]).dropna(subset=["fid"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = dict(zip(["adaln", "shift", "scale", "rotation", "rotation+scale"], "osD^v"))
    for (conditioning, mp), row in t.set_index(["conditioning", "mp"]).iterrows():
        color = plt.cm.viridis(RUNGS.index(mp) / 4) if mp in RUNGS else "black"
        ax.errorbar(row.params / 1e6, row.fid, yerr=[[row.fid - row.ci_low], [row.ci_high - row.fid]], fmt=markers.get(conditioning, "x"), color=color, capsize=2, label=label(conditioning, mp))
    ax.set(xlabel="parameters (M)", ylabel="FID", title="FID against parameters (colour: rung A→E)")
    ax.legend(fontsize=7, ncol=2)
    save(fig, path)


def read_metrics(out: Path, cell: str) -> pd.DataFrame | None:
    path = out / "cells" / cell / "metrics.csv"
    return pd.read_csv(path) if path.exists() else None


def curve_panels(grid: dict[str, Any], cells: list[str]) -> dict[str, list[str]]:
    """The run's cells by panel: each grid group that holds some of them, then one panel `other cells` for
    the cells no group names (a study's: a changed rung 'E~gate=scalar', a branch of the paper's code)."""
    def within(cell: str, group: dict[str, Any]) -> bool:
        parsed = cell_of(cell)
        return parsed.conditioning in group["conditioning"] and parsed.mp in group["mp"]

    panels = {name: [c for c in cells if within(c, group)] for name, group in grid["groups"].items()}
    panels["other cells"] = [c for c in cells if not any(within(c, g) for g in grid["groups"].values())]
    return {name: members for name, members in panels.items() if members} or {"no cells": []}


def plot_curves(out: Path, grid: dict[str, Any], cells: list[str], column: str, ylabel: str, path: Path, smooth: int = 5) -> None:
    """One panel per grid group the run's cells belong to (and one for the rest), one line per cell; the
    metric as logged by the cell's CSV logger."""
    panels = curve_panels(grid, cells)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (name, members) in zip(axes[0], panels.items()):
        for cell in members:
            metrics = read_metrics(out, cell)
            if metrics is None or column not in metrics:
                continue
            series = metrics[["step", column]].dropna()
            ax.plot(series.step, series[column].rolling(smooth, min_periods=1).mean(), label=cell)
        ax.set(title=name, xlabel="step", ylabel=ylabel)
        if ax.lines:  # a panel whose cells logged nothing yet stays empty
            ax.legend(fontsize=7)
    save(fig, path)


def plot_magnitudes(out: Path, cells: list[str], path: Path) -> None:
    """Activation RMS of the first, middle and last block over training, for every cell that logged it."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for cell in cells:
        metrics = read_metrics(out, cell)
        if metrics is None:
            continue
        blocks = sorted(c for c in metrics.columns if c.startswith("diag/act_rms/"))
        if not blocks:
            continue
        last = blocks[-1]
        for ax, prefix in zip(axes, ("diag/act_rms/", "diag/weight_rms/")):
            col = last.replace("diag/act_rms/", prefix)
            series = metrics[["step", col]].dropna()
            ax.plot(series.step, series[col], label=cell)
    axes[0].set_title("activation RMS of the last block")
    axes[1].set_title("weight RMS of the last block")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    save(fig, path)


def plot_block_magnitudes(runs: dict[str, Path], path: Path, max_step: int | None = None) -> None:
    """Per-block activation RMS (top) and weight RMS (bottom) over training, one column per run."""
    fig, axes = plt.subplots(2, len(runs), figsize=(5 * len(runs), 7), squeeze=False, sharey="row")
    for col, (name, metrics_csv) in enumerate(runs.items()):
        metrics = pd.read_csv(metrics_csv)
        if max_step is not None:
            metrics = metrics[metrics.step <= max_step]
        for row, prefix in enumerate(("diag/act_rms/", "diag/weight_rms/")):
            ax = axes[row][col]
            columns = sorted((c for c in metrics.columns if c.startswith(prefix)), key=lambda c: int(c.rsplit("_", 1)[1]))
            for i, column in enumerate(columns):
                series = metrics[["step", column]].dropna()
                ax.plot(series.step, series[column], color=plt.cm.viridis(i / max(1, len(columns) - 1)), label=f"block {i}")
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_title(f"{name}: {'activation' if row == 0 else 'weight'} RMS per block")
        axes[0][col].legend(fontsize=7)
    save(fig, path)


def fid_curves(out: Path, cells: list[str]) -> pd.DataFrame:
    """FID logged during training (`val/fid`, the profile's `fid_curve`) and the curve's last point from the
    final evaluation (result.json's `fid_curve_final`), one row per (cell, step)."""
    rows = []
    for cell in cells:
        metrics = read_metrics(out, cell)
        points = [] if metrics is None or "val/fid" not in metrics else list(metrics[["step", "val/fid"]].dropna().itertuples(index=False))
        result = out / "cells" / cell / "result.json"
        final = json.loads(result.read_text()).get("fid_curve_final") if result.exists() else None
        if final and all(int(step) != final["step"] for step, _ in points):
            points.append((final["step"], final["fid"]))
        parsed = cell_of(cell)
        for step, fid in points:
            rows.append({"cell": cell, "conditioning": parsed.conditioning, "mp": parsed.mp, "seed": parsed.seed, "step": int(step), "fid": fid})
    return pd.DataFrame(rows, columns=["cell", "conditioning", "mp", "seed", "step", "fid"])


def curve_means(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (conditioning, rung, step): the mean FID over seeds and its 95% t-interval (none for one seed)."""
    rows = []
    for (conditioning, mp, step), group in curves.groupby(["conditioning", "mp", "step"], sort=False):
        mean, n = group.fid.mean(), len(group)
        half = t_quantile_975(n - 1) * group.fid.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
        rows.append({"conditioning": conditioning, "mp": mp, "step": step, "fid": mean, "lo": mean - half, "hi": mean + half, "seeds": n})
    return pd.DataFrame(rows, columns=["conditioning", "mp", "step", "fid", "lo", "hi", "seeds"])


def steps_to_baseline(means: pd.DataFrame, baseline: dict[str, str]) -> dict[tuple[str, str], float]:
    """The first logged step at which each cell's mean curve reaches the baseline's FID at the baseline's last
    logged step (the same protocol on both sides, unlike the final evaluation's larger N)."""
    base = means[(means.conditioning == baseline["conditioning"]) & (means.mp == baseline["mp"])].sort_values("step")
    if base.empty:
        return {}
    target = base.fid.iloc[-1]
    out = {}
    for (conditioning, mp), group in means.groupby(["conditioning", "mp"], sort=False):
        reached = group.sort_values("step")
        reached = reached[reached.fid <= target]
        out[(conditioning, mp)] = float(reached.step.iloc[0]) if len(reached) else math.nan
    return out


def plot_fid_curves(means: pd.DataFrame, path: Path) -> None:
    """FID against training steps per cell: the mean over seeds, with its 95% interval where there are seeds."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for (conditioning, mp), group in means.groupby(["conditioning", "mp"], sort=False):
        group = group.sort_values("step")
        line = ax.plot(group.step, group.fid, marker="o", ms=3, label=f"{label(conditioning, mp)} ({group.seeds.max()} seeds)")
        if group.seeds.max() > 1:
            ax.fill_between(group.step, group.lo, group.hi, color=line[0].get_color(), alpha=0.15)
    ax.set(xlabel="step", ylabel="FID (curve protocol)")
    ax.set_yscale("log")
    ax.set_title("Convergence: FID during training, mean over seeds ± 95% interval")
    ax.legend(fontsize=7, ncol=2)
    save(fig, path)


def stored_cells(out: Path) -> list[str] | None:
    """The cells of the sweep whose Optuna store is out/optuna.db, in the sweep's order (None: no store)."""
    if not (out / "optuna.db").exists():
        return None
    import optuna

    summaries = optuna.get_all_study_summaries(f"sqlite:///{out / 'optuna.db'}")
    return next((s.user_attrs["cells"] for s in summaries if s.user_attrs.get("cells")), None)


def write_report(study, out: Path, profile: str, baseline: dict[str, str], crashed: dict[str, str] | None = None) -> Path:
    """Every table and plot of the sweep into `out` (the cells' results stay in out/cells); `crashed` names the
    cells that failed without a result and why."""
    cells = study.user_attrs["cells"] if study is not None else None
    grid = yaml.safe_load((HERE / "grid.yaml").read_text())
    if cells is None:  # rebuilt without the sweep: its cells in the order the sweep ran them, where it kept one
        cells = stored_cells(out) or sorted(p.name for p in (out / "cells").iterdir())
    results = load_results(out, cells, crashed)
    fids, params = fid_table(results, baseline), params_table(results)
    means = curve_means(fid_curves(out, cells))
    if not means.empty:
        reached = steps_to_baseline(means, baseline)
        fids["steps_to_baseline"] = [reached.get((c, m), math.nan) for c, m in zip(fids.conditioning, fids.mp)]
        plot_fid_curves(means, out / "fid_curves.png")
        means.to_csv(out / "fid_curves.csv", index=False)
        wide = means.assign(cell=[label(c, m) for c, m in zip(means.conditioning, means.mp)]).pivot(index="step", columns="cell", values="fid")
        (out / "fid_curves.md").write_text(wide.reset_index().to_markdown(index=False, floatfmt=".1f") + "\n")
    write_table(fids, out / "fid_table")
    write_table(params, out / "params_table")
    if fids.fid.notna().any():
        plot_fid(fids, out / "fid_per_cell.png")
        plot_fid_vs_params(fids, params, out / "fid_vs_params.png")
    plot_curves(out, grid, cells, "train/loss", "training loss (smoothed)", out / "loss_curves.png")
    plot_curves(out, grid, cells, "diag/class_spread", "class spread of ε̂ / RMS of ε̂", out / "class_spread.png", smooth=1)
    plot_magnitudes(out, cells, out / "magnitude_curves.png")
    results.to_csv(out / "cells.csv", index=False)
    if "fid" in results:
        write_claims(results, out)
        write_leave_one_out(results, out.parent / profile, out)  # cells with a changed flag, against the profile's grid
    return out


def reproduction(new: Path, committed: Path) -> pd.DataFrame:
    """Per (conditioning, rung) of a fresh run: its FID, the committed run's, the difference, and whether the
    fresh FID lies within the committed spread. Where the committed cell has n ≥ 2 seeds, the spread is the 95%
    prediction interval for the mean of the fresh run's k seeds, mean ± t·s·√(1/n + 1/k): the committed
    t-interval of the mean (half-width t·s/√n) widened by √(1 + n/k), because a fresh mean scatters around the
    true FID as much as the committed one does. Where it has one seed, its bootstrap interval over the
    generated images, which leaves out run-to-run variation (the `spread` column says which)."""
    ours, theirs = pd.read_csv(new / "fid_table.csv"), pd.read_csv(committed / "fid_table.csv")
    table = ours[["conditioning", "mp", "seeds", "fid"]].merge(
        theirs[["conditioning", "mp", "seeds", "fid", "ci_low", "ci_high"]], on=["conditioning", "mp"], how="left", suffixes=("", "_committed")
    )
    n, k = table.seeds_committed, table.seeds.clip(lower=1)
    widen = ((1 + n / k) ** 0.5).where(n >= 2, 1.0)
    table["committed_low"] = table.fid_committed - (table.fid_committed - table.ci_low) * widen
    table["committed_high"] = table.fid_committed + (table.ci_high - table.fid_committed) * widen
    table["spread"] = [f"95% prediction, {int(s)} seeds" if s >= 2 else "95% bootstrap, 1 run" for s in n.fillna(0)]
    table["diff_pct"] = 100 * (table.fid - table.fid_committed) / table.fid_committed
    table["within_committed_spread"] = (table.fid >= table.committed_low) & (table.fid <= table.committed_high)
    return table.drop(columns=["ci_low", "ci_high"])


def write_reproduction(new: Path, committed: Path) -> str:
    table = reproduction(new, committed)
    text = (
        f"# Reproduction of {committed} by {new}\n\n"
        f"{int(table.within_committed_spread.sum())} of {len(table)} cells within the committed spread.\n\n"
        + table.to_markdown(index=False, floatfmt=".2f")
        + "\n"
    )
    (new / "reproduction.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    """`python -m ablations.report [SWEEP_DIR]` rebuilds a sweep's report;
    `python -m ablations.report magnitudes OUT.png NAME=metrics.csv ... [--max-step N]` plots runs' magnitudes."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "magnitudes":
        max_step = int(argv[argv.index("--max-step") + 1]) if "--max-step" in argv else None
        runs = dict(a.split("=", 1) for a in argv[2:] if "=" in a)
        plot_block_magnitudes({k: Path(v) for k, v in runs.items()}, Path(argv[1]), max_step)
        print(argv[1])
        return
    out = Path(argv[0] if argv else "results/ablations/cpu")
    from ablations.artifacts import relocate_artifacts

    relocate_artifacts(out)  # a clone's copy of a sweep: its MLflow runs find their artifacts here
    grid = yaml.safe_load((HERE / "grid.yaml").read_text())
    run = out / "sweep_run.json"
    info = json.loads(run.read_text()) if run.exists() else {}
    print(write_report(None, out, info.get("profile", out.name), grid["baseline"], info.get("crashed")))


if __name__ == "__main__":
    main()
