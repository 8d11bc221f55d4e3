"""Crash-safe, parallel sweeps (slow: run with `make test-slow`).

A sweep killed with SIGKILL at random moments finishes when rerun, with the tables of an uninterrupted
sweep; two workers started at once on one storage never train the same cell."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
CELLS = "adaln-A-s0,rotation-A-s0,rotation+scale-E-s0"
pytestmark = pytest.mark.slow


def sweep_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ablations.sweep", "--profile", "smoke", "--out", str(out), "--cells", CELLS, *extra]


def run_sweep(out: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(sweep_cmd(out, *extra), cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def fid_table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "fid_table.csv")[["conditioning", "mp", "fid", "ci_low", "ci_high"]]


def reference_features_used(out: Path) -> set[str]:
    return {json.loads(p.read_text())["protocol"]["reference_sha256"] for p in (out / "cells").glob("*/result.json")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert run_sweep(out, out / "log").wait(timeout=900) == 0, (out / "log").read_text()[-3000:]
    return out


def test_sweep_killed_at_random_moments_finishes_with_the_same_tables(uninterrupted, tmp_path):
    rng = random.Random(0)
    out = tmp_path / "killed"
    for attempt in range(4):
        proc = run_sweep(out, tmp_path / f"log{attempt}")
        time.sleep(rng.uniform(5, 40))
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    final = run_sweep(out, tmp_path / "final")
    assert final.wait(timeout=900) == 0, (tmp_path / "final").read_text()[-3000:]
    assert reference_features_used(out) == reference_features_used(uninterrupted)  # one cache: the same yardstick
    pd.testing.assert_frame_equal(fid_table(out), fid_table(uninterrupted), rtol=1e-6)


def test_two_workers_never_train_the_same_cell(uninterrupted, tmp_path):
    out = tmp_path / "parallel"
    workers = [run_sweep(out, tmp_path / f"worker{i}") for i in range(2)]
    for w in workers:
        assert w.wait(timeout=900) == 0
    logs = "".join((tmp_path / f"worker{i}").read_text() for i in range(2))
    trained = re.findall(r"\[sweep\] (\S+): training", logs)
    assert sorted(trained) == sorted(CELLS.split(",")), trained  # each cell trained exactly once
    pd.testing.assert_frame_equal(fid_table(out), fid_table(uninterrupted), rtol=1e-6)
