"""Which of rung E's design choices costs it its FID: each choice reverted alone, against rung E's seeds.

A cell `adaln-E~gate=scalar-s0` is rung E with one flag changed (grid.yaml `studies.leave_one_out`). Its FID is
read against the base rung's cells in the profile's grid (results/ablations/<profile>/): the base's mean over
n seeds, and the spread a fresh mean of k seeds of an unchanged rung E would show, the 95% prediction interval
mean ± t(n−1)·s·√(1/n + 1/k). A change *matters* when the changed cell's mean lies outside that interval, and
then it helps (below) or hurts (above); within it, these seeds cannot tell it from rung E.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ablations.claims import t_quantile_975

RULE = (
    "a change helps if its FID (mean over its k seeds) lies below rung E's 95% prediction interval for a mean of k "
    "fresh seeds (mean ± t·s·√(1/n + 1/k) over rung E's n seeds), hurts if above, and is within rung E's spread "
    "otherwise; 'share of the A–E gap' is (FID_E − FID_changed) / (FID_E − FID_A)"
)


def changed_cells(results: pd.DataFrame) -> pd.DataFrame:
    """The finished cells whose rung has a '~flag=value' change."""
    done = results[(results.status == "complete") & results.mp.str.contains("~", regex=False)]
    return done


def prediction_interval(fids: pd.Series, k: int) -> tuple[float, float]:
    """The 95% prediction interval for the mean of k fresh seeds, from n ≥ 2 seeds' FIDs."""
    n = len(fids)
    if n < 2:
        return math.nan, math.nan
    half = t_quantile_975(n - 1) * fids.std(ddof=1) * math.sqrt(1 / n + 1 / k)
    return fids.mean() - half, fids.mean() + half


def leave_one_out(results: pd.DataFrame, reference: pd.DataFrame, baseline_rung: str = "A") -> pd.DataFrame:
    """One row per change: its FID, rung E's (the base's) mean and prediction interval, the difference, the
    share of the A–E gap it closes, and what the rule says."""
    ref = reference[reference.status == "complete"]
    rows = []
    for (conditioning, mp), group in changed_cells(results).groupby(["conditioning", "mp"], sort=False):
        base, _, change = mp.partition("~")
        base_fids = ref[(ref.conditioning == conditioning) & (ref.mp == base)].fid
        a_fids = ref[(ref.conditioning == conditioning) & (ref.mp == baseline_rung)].fid
        fid, k = group.fid.mean(), len(group)
        low, high = prediction_interval(base_fids, k)
        e, a = base_fids.mean(), a_fids.mean()
        effect = "helps" if fid < low else "hurts" if fid > high else "within rung E's spread" if low == low else "n/a"
        rows.append(
            {
                "change": change.replace("~", ", "),
                "conditioning": conditioning,
                "base": base,
                "seeds": k,
                "fid": fid,
                "base_fid": e,
                "base_seeds": len(base_fids),
                "base_low": low,
                "base_high": high,
                "diff": fid - e,
                "diff_pct": 100 * (fid - e) / e,
                "gap_share_pct": 100 * (e - fid) / (e - a) if len(a_fids) and e != a else math.nan,
                "params": int(group.params.iloc[0]),
                "effect": effect,
            }
        )
    return pd.DataFrame(rows)


def write_leave_one_out(results: pd.DataFrame, reference_dir: Path, out: Path) -> pd.DataFrame | None:
    """leave_one_out.md and .csv in `out`, against the grid in `reference_dir`; None if no cell has a change."""
    if changed_cells(results).empty or not (reference_dir / "cells.csv").exists():
        return None
    table = leave_one_out(results, pd.read_csv(reference_dir / "cells.csv"))
    table.to_csv(out / "leave_one_out.csv", index=False)
    show = table.assign(
        interval=[f"[{lo:.1f}, {hi:.1f}]" for lo, hi in zip(table.base_low, table.base_high)],
    )[["change", "seeds", "fid", "diff", "diff_pct", "gap_share_pct", "interval", "effect", "params"]]
    text = (
        "# Rung E with one design choice changed\n\n"
        f"Written by `ablations.report` from the cells' `result.json` in `{out}` against rung E and rung A of "
        f"`{reference_dir}` (never typed). Rung E: FID {table.base_fid.iloc[0]:.1f}, mean of "
        f"{table.base_seeds.iloc[0]} seeds; `interval` is its 95% prediction interval for a mean of as many seeds "
        "as the changed cell has.\n\n"
        + show.to_markdown(index=False, floatfmt=".1f")
        + f"\n\nRule: {RULE}.\n"
    )
    (out / "leave_one_out.md").write_text(text)
    return table
