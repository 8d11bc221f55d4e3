"""Verdicts on the paper's claims are computed from the cells by a stated rule, and can come out any way."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from ablations.claims import MARGIN_PCT, claims, paired, write_claims


def results(fids: dict[tuple[str, str], list[float]], params: dict[tuple[str, str], int] | None = None) -> pd.DataFrame:
    params = params or {}
    rows = []
    for (conditioning, mp), values in fids.items():
        for seed, fid in enumerate(values):
            rows.append({"conditioning": conditioning, "mp": mp, "seed": seed, "fid": fid, "status": "complete",
                         "params": params.get((conditioning, mp), 1000 if conditioning == "adaln" else 940)})
    return pd.DataFrame(rows)


def by_statement(rows, words):
    return next(r for r in rows if all(w in r["statement"] for w in words))


def test_paired_difference_is_relative_per_seed_with_a_t_interval():
    c = paired(results({("adaln", "A"): [100, 110, 90], ("adaln", "E"): [90, 99, 81]}), ("adaln", "A"), ("adaln", "E"))
    assert c["diff_pct"] == pytest.approx([-10, -10, -10]) and c["effect_pct"] == pytest.approx(-10)
    assert c["ci_low"] == pytest.approx(-10) and c["ci_high"] == pytest.approx(-10)  # no spread: a point
    c = paired(results({("adaln", "A"): [100, 100, 100], ("adaln", "E"): [90, 100, 110]}), ("adaln", "A"), ("adaln", "E"))
    half = 4.302653 * 10 / math.sqrt(3)  # t_{0.975, 2} · sd / √n
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((-half, half), rel=1e-5)


def test_the_detectable_effect_is_what_the_seeds_spread_decides_with_80_percent_power():
    from scipy.stats import t

    c = paired(results({("adaln", "A"): [100, 100, 100], ("adaln", "E"): [90, 88, 92]}), ("adaln", "A"), ("adaln", "E"))
    assert c["detectable_pct"] == pytest.approx((t.ppf(0.975, 2) + t.ppf(0.8, 2)) * 2 / math.sqrt(3))  # s = 2 over 3 seeds
    eight = paired(results({("adaln", "A"): [100] * 8, ("adaln", "E"): [90, 88, 92] * 2 + [90, 90]}), ("adaln", "A"), ("adaln", "E"))
    assert eight["detectable_pct"] < c["detectable_pct"] / 2  # more seeds: a smaller effect is decided
    assert math.isnan(paired(results({("adaln", "A"): [100], ("adaln", "E"): [90]}), ("adaln", "A"), ("adaln", "E"))["detectable_pct"])


@pytest.mark.parametrize(
    "e_fids, verdict",
    [([80, 85, 90], "supported"), ([120, 125, 118], "contradicted"), ([80, 125, 100], "inconclusive")],
)
def test_claim_one_verdict_follows_the_rule(e_fids, verdict):
    r = results({("adaln", "A"): [100, 100, 100], ("adaln", "E"): e_fids})
    assert by_statement(claims(r), ["rung E", "adaln"])["verdict"] == verdict


def test_one_seed_is_never_a_verdict():
    r = results({("adaln", "A"): [100], ("adaln", "E"): [50]})
    assert by_statement(claims(r), ["rung E", "adaln"])["verdict"] == "inconclusive"


@pytest.mark.parametrize(
    "rs_fids, rs_params, verdict",
    [
        ([101, 102, 100], 940, "supported"),  # within the margin, fewer parameters
        ([97, 98, 99], 940, "supported"),  # better
        ([120, 121, 119], 940, "contradicted"),  # clearly worse than the margin
        ([100, 100, 100], 1000, "contradicted"),  # no parameter saving
        ([90, 115, 103], 940, "inconclusive"),  # too noisy to say
    ],
)
def test_claim_two_is_non_inferiority_within_the_margin_with_fewer_parameters(rs_fids, rs_params, verdict):
    r = results({("adaln", "E"): [100, 100, 100], ("rotation+scale", "E"): rs_fids}, {("rotation+scale", "E"): rs_params})
    row = by_statement(claims(r), ["rung E", "competitive"])
    assert row["verdict"] == verdict and str(MARGIN_PCT).rstrip("0").rstrip(".") in row["rule"]


def test_the_paper_models_get_rows_of_their_own_where_their_cells_ran():
    ladder = results({("adaln", "A"): [100, 100, 100], ("adaln", "E"): [120, 125, 118]})
    assert [(r["a"], r["b"]) for r in claims(ladder)] == [("adaln/A", "adaln/E"), ("adaln/A", "rotation+scale/A"), ("adaln/E", "rotation+scale/E")]
    paper = results({("adaln", "morph/A"): [100, 100, 100], ("adaln", "morph/E"): [80, 85, 90], ("adaln", "old-mod_opts"): [90, 90, 90],
                     ("rotation+scale", "old-mod_opts"): [91, 92, 90]}, {("rotation+scale", "old-mod_opts"): 940})  # fmt: skip
    rows = {(r["claim"], r["a"], r["b"]): r for r in claims(paper)}
    assert set(rows) == {(1, "adaln/morph/A", "adaln/morph/E"), (2, "adaln/old-mod_opts", "rotation+scale/old-mod_opts")}
    assert rows[1, "adaln/morph/A", "adaln/morph/E"]["verdict"] == "supported"
    assert rows[2, "adaln/old-mod_opts", "rotation+scale/old-mod_opts"]["verdict"] == "supported"


def test_claims_files_are_written_with_their_rule(tmp_path):
    r = results({("adaln", "A"): [100, 101, 99], ("adaln", "E"): [90, 91, 89]})
    write_claims(r, tmp_path)
    rows = json.loads((tmp_path / "claims.json").read_text())
    assert rows[0]["verdict"] == "supported" and rows[0]["seeds"] == [0, 1, 2]
    text = (tmp_path / "claims.md").read_text()
    assert "**supported**" in text and "Rules:" in text and "inconclusive" in text



def test_reproduction_report_says_which_cells_lie_within_the_committed_spread(tmp_path):
    from ablations.report import reproduction, write_reproduction

    committed, fresh = tmp_path / "committed", tmp_path / "fresh"
    committed.mkdir(), fresh.mkdir()
    pd.DataFrame(
        {"conditioning": ["adaln", "adaln", "shift"], "mp": ["A", "E", "A"], "seeds": [3, 3, 1], "fid": [100.0, 90.0, 70.0],
         "ci_low": [95.0, 88.0, 68.0], "ci_high": [105.0, 92.0, 72.0]}
    ).to_csv(committed / "fid_table.csv", index=False)
    pd.DataFrame({"conditioning": ["adaln", "adaln", "shift"], "mp": ["A", "E", "A"], "seeds": [3, 3, 1], "fid": [106.0, 80.0, 73.0]}).to_csv(
        fresh / "fid_table.csv", index=False
    )
    text = write_reproduction(fresh, committed)
    # A: the mean's interval (±5) widened by √(1 + 3/3) for a fresh mean of 3 seeds → ±7.07 holds 106;
    # E: ±2·√2 does not hold 80; one committed seed: its bootstrap interval, not widened, does not hold 73.
    assert "1 of 3 cells within the committed spread" in text and (fresh / "reproduction.md").read_text() == text
    assert "6.00" in text and "-11.11" in text  # the differences in % of the committed FID
    assert "95% prediction, 3 seeds" in text and "95% bootstrap, 1 run" in text

    pd.DataFrame({"conditioning": ["adaln"], "mp": ["A"], "seeds": [1], "fid": [109.0]}).to_csv(fresh / "fid_table.csv", index=False)
    row = reproduction(fresh, committed).iloc[0]  # one fresh seed scatters more: ±5·√(1 + 3) = ±10
    assert row.within_committed_spread and abs(row.committed_high - 110.0) < 1e-9


def test_a_sweep_whose_every_cell_failed_still_gets_its_tables():
    from ablations.report import params_table

    failed = pd.DataFrame([{"cell": "adaln-A-s0", "conditioning": "adaln", "mp": "A", "seed": 0, "status": "failed", "reason": "x"}])
    assert params_table(failed).empty


@pytest.mark.parametrize("sweep", ["cpu", "cpu_fixed_optimizer"])
def test_the_readme_quotes_the_committed_claims_as_the_code_writes_them_from_the_cells(sweep, tmp_path):
    root = Path(__file__).resolve().parents[1]
    folder = root / "results" / "ablations" / sweep
    write_claims(pd.read_csv(folder / "cells.csv"), tmp_path)  # the verdicts again, from the committed cells
    committed = (folder / "claims.md").read_text()
    assert (tmp_path / "claims.md").read_text() == committed
    rows = [line for line in committed.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    readme = (root / "README.md").read_text()
    assert len(rows) == 4 and all(row in readme for row in rows), f"README.md does not quote {folder / 'claims.md'}"


def test_the_committed_fp32_pair_is_judged_as_the_code_judges_it_and_the_readme_quotes_its_intervals(tmp_path):
    import shutil

    from ablations.report import reproduction, write_reproduction

    root = Path(__file__).resolve().parents[1] / "results" / "ablations"
    shutil.copy(root / "cpu_fp32" / "fid_table.csv", tmp_path / "fid_table.csv")

    def body(text: str) -> str:  # without the title, which names the folders
        return text.split("\n", 1)[1]

    assert body(write_reproduction(tmp_path, root / "cpu")) == body((root / "cpu_fp32" / "reproduction.md").read_text())
    readme = (root.parents[1] / "README.md").read_text()
    for row in reproduction(tmp_path, root / "cpu").itertuples():
        quoted = f"| {row.conditioning} / {row.mp} | {row.fid:.2f} [" in readme and f"{row.fid_committed:.2f} [{row.committed_low:.2f}, {row.committed_high:.2f}]" in readme
        assert quoted and row.within_committed_spread, row


def test_leave_one_out_reads_each_change_against_rung_es_prediction_interval(tmp_path):
    from ablations.leave_one_out import leave_one_out, write_leave_one_out

    reference = results({("adaln", "A"): [58, 60, 62], ("adaln", "E"): [80, 84, 88]})
    changed = results({("adaln", "E~gate=scalar"): [60], ("adaln", "E~norm=rmsnorm"): [85], ("adaln", "E~gains=per_block"): [120]})
    table = leave_one_out(changed, reference).set_index("change")
    # rung E: mean 84, s 4, n 3; one fresh seed: 84 ± t(2)·4·√(1/3 + 1) = 84 ± 19.87
    assert table.loc["gate=scalar", "base_low"] == pytest.approx(84 - 4.302653 * 4 * math.sqrt(4 / 3), rel=1e-5)
    assert table.effect.to_dict() == {"gate=scalar": "helps", "norm=rmsnorm": "within rung E's spread", "gains=per_block": "hurts"}
    assert table.loc["gate=scalar", "gap_share_pct"] == pytest.approx(100)  # it closes the whole A–E gap
    assert table.loc["gains=per_block", "diff_pct"] == pytest.approx(100 * 36 / 84)
    two = leave_one_out(results({("adaln", "E~gate=scalar"): [70, 71]}), reference)  # k = 2 seeds: a narrower interval
    assert two.base_high.iloc[0] == pytest.approx(84 + 4.302653 * 4 * math.sqrt(1 / 3 + 1 / 2), rel=1e-5)
    (tmp_path / "cpu").mkdir()
    reference.to_csv(tmp_path / "cpu" / "cells.csv", index=False)
    assert write_leave_one_out(changed, tmp_path / "cpu", tmp_path) is not None
    assert "gate=scalar" in (tmp_path / "leave_one_out.md").read_text()
    assert write_leave_one_out(reference, tmp_path / "cpu", tmp_path / "cpu") is None  # no changed cell: no table


def test_curve_panels_draw_each_cell_once_a_studys_beside_the_groups():
    from ablations.cells import HERE, load_yaml
    from ablations.report import curve_panels

    grid = load_yaml(HERE / "grid.yaml")
    assert curve_panels(grid, ["adaln-E~gate=scalar-s0", "adaln-morph_A-s0"]) == {"other cells": ["adaln-E~gate=scalar-s0", "adaln-morph_A-s0"]}
    panels = curve_panels(grid, ["adaln-A-s0", "shift-E-s0", "adaln-C-s0"])
    assert panels == {"ladder": ["adaln-A-s0", "adaln-C-s0"], "strategies": ["adaln-A-s0", "shift-E-s0"], "claims": ["adaln-A-s0"]}
    assert curve_panels(grid, []) == {"no cells": []}


def test_a_report_rebuilt_without_the_sweep_keeps_the_sweeps_cell_order(tmp_path):
    from ablations.cells import HERE, load_yaml, study_cells
    from ablations.report import stored_cells

    committed = Path(__file__).resolve().parents[1] / "results" / "ablations" / "leave_one_out"
    assert stored_cells(committed) == [c.id for c in study_cells(load_yaml(HERE / "grid.yaml"), "leave_one_out", [0])]
    assert pd.read_csv(committed / "cells.csv").cell.tolist() == stored_cells(committed)  # as `make report` wrote it
    assert stored_cells(tmp_path) is None  # no store: the folders' sorted order
