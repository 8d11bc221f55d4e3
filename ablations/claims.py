"""The paper's two claims, decided by code from a sweep's cells: the effect, its interval over seeds, a verdict.

Every number comes from the cells' `result.json` files; every verdict from the rule written beside it in
`claims.md` and `claims.json`. Comparisons are paired by seed (the same seed trains both cells of a pair, so
data order and noise are shared) and relative: 100 · (FID_b − FID_a) / FID_a per seed, then the mean and its
95% Student-t interval over the seeds both cells finished.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

MARGIN_PCT = 5.0  # "competitive": the FID of the candidate is at most this much worse than the baseline's
MIN_SEEDS = 2  # an interval needs two seeds; the grid asks for three
POWER = 0.8  # the detectable effect: the distance from a rule's boundary decided this often at these seeds

RULE_LOWER = (
    "supported if the 95% interval of the paired relative FID difference lies below 0 (b is better), "
    "contradicted if it lies above 0 (b is worse), inconclusive otherwise or with fewer than 2 seeds"
)
RULE_COMPETITIVE = (
    f"supported if b has fewer parameters than a and the 95% interval of the paired relative FID difference "
    f"lies below +{MARGIN_PCT:g}% (b at most {MARGIN_PCT:g}% worse: non-inferior), contradicted if b has no fewer "
    f"parameters or the interval lies above +{MARGIN_PCT:g}%, inconclusive otherwise or with fewer than 2 seeds"
)


def t_quantile_975(dof: int) -> float:
    """Two-sided 95% Student-t quantile."""
    return t_quantile(0.975, dof)


def t_quantile(q: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, dof))


def paired(results: pd.DataFrame, a: tuple[str, str], b: tuple[str, str]) -> dict[str, Any]:
    """The relative FID difference b − a (in % of a) per seed both finished, with its mean and 95% t-interval."""
    done = results[results.status == "complete"]

    def fids(cell: tuple[str, str]) -> pd.Series:
        rows = done[(done.conditioning == cell[0]) & (done.mp == cell[1])]
        return rows.set_index("seed").fid

    fa, fb = fids(a), fids(b)
    seeds = sorted(set(fa.index) & set(fb.index))
    diffs = [100 * (fb[s] - fa[s]) / fa[s] for s in seeds]
    out: dict[str, Any] = {
        "a": "/".join(a),
        "b": "/".join(b),
        "seeds": seeds,
        "fid_a": [float(fa[s]) for s in seeds],
        "fid_b": [float(fb[s]) for s in seeds],
        "diff_pct": diffs,
        "effect_pct": float(sum(diffs) / len(diffs)) if diffs else math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "detectable_pct": math.nan,
    }
    if len(diffs) >= MIN_SEEDS:
        n, mean = len(diffs), out["effect_pct"]
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = t_quantile_975(n - 1) * sd / math.sqrt(n)
        # A true effect this far from the rule's boundary (0, or the +5% margin) puts the interval past it with
        # probability POWER, at this many seeds and the seeds' own spread: (t_0.975 + t_POWER) · s / √n.
        detectable = (t_quantile_975(n - 1) + t_quantile(POWER, n - 1)) * sd / math.sqrt(n)
        out |= {"ci_low": mean - half, "ci_high": mean + half, "detectable_pct": detectable}
    return out


def verdict_lower(c: dict[str, Any]) -> str:
    if len(c["seeds"]) < MIN_SEEDS:
        return "inconclusive"
    return "supported" if c["ci_high"] < 0 else "contradicted" if c["ci_low"] > 0 else "inconclusive"


def verdict_competitive(c: dict[str, Any], params_a: float, params_b: float) -> str:
    if not params_b < params_a:
        return "contradicted" if math.isfinite(params_a) and math.isfinite(params_b) else "inconclusive"
    if len(c["seeds"]) < MIN_SEEDS:
        return "inconclusive"
    return "supported" if c["ci_high"] < MARGIN_PCT else "contradicted" if c["ci_low"] > MARGIN_PCT else "inconclusive"


def params_of(results: pd.DataFrame, cell: tuple[str, str]) -> float:
    rows = results[(results.conditioning == cell[0]) & (results.mp == cell[1]) & (results.status == "complete")]
    return float(rows.params.iloc[0]) if len(rows) else math.nan


PAPER_CLAIM_1 = "-12.8% FID (adaln, DiT-S/4, ImageNet-128 latents, 400K steps)"
PAPER_CLAIM_2 = "competitive FID with 5.4% fewer parameters (rung E)"
# (claim, cell a, cell b, statement): the suite's ladder, then the paper's own models (grid.yaml: paper_models)
COMPARISONS = [
    *((1, (s, "A"), (s, "E"), f"the full MP DiT (rung E) reaches a lower FID than the standard DiT (rung A), {s}") for s in ("adaln", "rotation+scale")),
    *((2, ("adaln", r), ("rotation+scale", r), f"rotation+scale is competitive with adaln with fewer parameters, rung {r}") for r in ("A", "E")),
    (1, ("adaln", "morph/A"), ("adaln", "morph/E"), "the paper's MP DiT (morph, every use_* flag on) reaches a lower FID than its standard DiT (all off)"),
    (2, ("adaln", "old-mod_opts"), ("rotation+scale", "old-mod_opts"), "rotation+scale is competitive with adaln with fewer parameters, the paper's models (old-mod_opts)"),
]


def claims(results: pd.DataFrame) -> list[dict[str, Any]]:
    """Claim 1 (the MP DiT's FID against the standard DiT's) and claim 2 (rotation+scale against adaln), for
    every comparison of `COMPARISONS` whose cells the results hold at least one of: the ladder's (adaln and
    rotation+scale; rungs A and E) and the paper's own models'."""
    present = set(zip(results.conditioning, results.mp)) if len(results) else set()
    out = []
    for claim, a, b, statement in COMPARISONS:
        if not {a, b} & present:
            continue
        c = paired(results, a, b)
        if claim == 1:
            out.append({"claim": 1, "statement": statement, "paper": PAPER_CLAIM_1, **c, "verdict": verdict_lower(c), "rule": RULE_LOWER})
            continue
        pa, pb = params_of(results, a), params_of(results, b)
        out.append(
            {
                "claim": 2,
                "statement": statement,
                "paper": PAPER_CLAIM_2,
                **c,
                "params_a": pa,
                "params_b": pb,
                "params_diff_pct": 100 * (pb - pa) / pa if pa == pa and pb == pb else math.nan,
                "verdict": verdict_competitive(c, pa, pb),
                "rule": RULE_COMPETITIVE,
            }
        )
    return out


DETECTABLE = (
    f"the smallest distance of the true effect from the rule's boundary (0 for claim 1, +{MARGIN_PCT:g}% for claim 2) "
    f"that these seeds decide with {POWER:.0%} power, (t_0.975 + t_{POWER:g}) · s / √n over the n seeds' paired "
    "differences; an effect nearer the boundary than this needs more seeds"
)


def detectable(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"±{x:.1f}"


def fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.1f}"


def claims_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# The paper's claims, decided from this sweep's cells",
        "",
        "Written by `ablations.report` from the cells' `result.json` (never typed). Effects are paired by seed:",
        "100 · (FID_b − FID_a) / FID_a per seed, mean and 95% Student-t interval over the seeds both cells finished.",
        "",
        "| claim | comparison (a → b) | seeds | FID a | FID b | effect % | 95% interval % | detectable % | parameters % | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mean = lambda v: f"{sum(v) / len(v):.1f}" if v else "n/a"  # noqa: E731
        lines.append(
            f"| {r['claim']} | {r['a']} → {r['b']} | {len(r['seeds'])} | {mean(r['fid_a'])} | {mean(r['fid_b'])} | "
            f"{fmt(r['effect_pct'])} | [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}] | {detectable(r['detectable_pct'])} | {fmt(r.get('params_diff_pct'))} | "
            f"**{r['verdict']}** |"
        )
    lines += ["", "Rules:", f"- claim 1: {RULE_LOWER}.", f"- claim 2: {RULE_COMPETITIVE}.", f"- detectable: {DETECTABLE}.", ""]
    for r in rows:
        lines.append(f"- claim {r['claim']}, {r['statement']}: the paper says {r['paper']}.")
    return "\n".join(lines) + "\n"


def write_claims(results: pd.DataFrame, out: Path) -> list[dict[str, Any]]:
    rows = claims(results)
    (out / "claims.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
    (out / "claims.md").write_text(claims_markdown(rows))
    return rows
