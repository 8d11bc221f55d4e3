"""Verdicts on the paper's claims are computed from the cells by a stated rule, and can come out any way."""
import json
import math

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


def test_claims_files_are_written_with_their_rule(tmp_path):
    r = results({("adaln", "A"): [100, 101, 99], ("adaln", "E"): [90, 91, 89]})
    write_claims(r, tmp_path)
    rows = json.loads((tmp_path / "claims.json").read_text())
    assert rows[0]["verdict"] == "supported" and rows[0]["seeds"] == [0, 1, 2]
    text = (tmp_path / "claims.md").read_text()
    assert "**supported**" in text and "Rules:" in text and "inconclusive" in text



def test_reproduction_report_says_which_cells_lie_within_the_committed_spread(tmp_path):
    from ablations.report import write_reproduction

    committed, fresh = tmp_path / "committed", tmp_path / "fresh"
    committed.mkdir(), fresh.mkdir()
    pd.DataFrame(
        {"conditioning": ["adaln", "adaln"], "mp": ["A", "E"], "seeds": [3, 3], "fid": [100.0, 90.0], "ci_low": [95.0, 88.0], "ci_high": [105.0, 92.0]}
    ).to_csv(committed / "fid_table.csv", index=False)
    pd.DataFrame({"conditioning": ["adaln", "adaln"], "mp": ["A", "E"], "seeds": [3, 3], "fid": [103.0, 80.0]}).to_csv(fresh / "fid_table.csv", index=False)
    text = write_reproduction(fresh, committed)
    assert "1 of 2 cells within the committed spread" in text and (fresh / "reproduction.md").read_text() == text
    assert "3.00" in text and "-11.11" in text  # the differences in % of the committed FID


def test_a_sweep_whose_every_cell_failed_still_gets_its_tables():
    from ablations.report import params_table

    failed = pd.DataFrame([{"cell": "adaln-A-s0", "conditioning": "adaln", "mp": "A", "seed": 0, "status": "failed", "reason": "x"}])
    assert params_table(failed).empty
