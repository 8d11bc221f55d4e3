"""Parallel sweep workers on one PostgreSQL storage (slow; needs Debian's `postgresql`, else skipped).

The tests start their own server on loopback in a temporary folder and stop it afterwards; each test gets
a fresh database for the Optuna study and one for MLflow, as a cluster's workers would share them."""
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from test_reliability import CELLS, fid_table, run_sweep

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A running server: a function that creates a database and returns its URL."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not binaries:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[dev]')")
    bin_dir = Path(binaries[-1]).parent
    folder = Path(tempfile.mkdtemp(prefix="lit_mpdit_pg_", dir="/tmp"))  # short: unix socket paths are limited
    as_owner: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the package's `postgres` user
        shutil.chown(folder, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = folder / "data"
    subprocess.run([*as_owner, bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_owner, bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", folder / "log", "-w", "start"], check=True, capture_output=True)

    def database(name: str) -> str:
        subprocess.run([*as_owner, bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name], check=True, capture_output=True)
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"

    try:
        yield database
    finally:
        subprocess.run([*as_owner, bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_on_postgres_never_train_the_same_cell(postgres, tmp_path):
    out = tmp_path / "parallel"
    stores = ("--storage", postgres("parallel_optuna"), "--tracking-uri", postgres("parallel_mlflow"))
    workers = [run_sweep(out, tmp_path / f"worker{i}", *stores) for i in range(2)]
    for i, w in enumerate(workers):
        assert w.wait(timeout=900) == 0, (tmp_path / f"worker{i}").read_text()[-3000:]
    logs = "".join((tmp_path / f"worker{i}").read_text() for i in range(2))
    trained = re.findall(r"\[sweep\] (\S+): training", logs)
    assert sorted(trained) == sorted(CELLS.split(",")), trained  # each cell trained exactly once
    table = fid_table(out)
    assert len(table) == 3 and table.fid.notna().all()
    assert not pd.isna(table.ci_low).any()


def test_a_killed_workers_cell_is_found_stale_and_resumed_by_another(postgres, tmp_path):
    cell, out = "rotation-A-s0", tmp_path / "sweep"
    storage = postgres("stale_optuna")
    stores = ("--storage", storage, "--tracking-uri", postgres("stale_mlflow"), "--cells", cell)  # the last --cells wins
    dead = run_sweep(out, tmp_path / "dead", *stores)
    checkpoint = out / "cells" / cell / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not checkpoint.exists():  # mid-cell: trained part of the way, not evaluated
        assert dead.poll() is None and time.time() < deadline, (tmp_path / "dead").read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1)  # let the checkpoint's write finish
    os.killpg(dead.pid, signal.SIGKILL)
    dead.wait()
    assert not (out / "cells" / cell / "result.json").exists()

    # The dead trial stays RUNNING until its heartbeat is older than the grace period; then the
    # second worker fails it, the retry callback queues the cell again, and it resumes.
    survivor = run_sweep(out, tmp_path / "survivor", *stores)
    assert survivor.wait(timeout=900) == 0, (tmp_path / "survivor").read_text()[-3000:]
    log = (tmp_path / "survivor").read_text()
    assert re.search(rf"\[sweep\] {re.escape(cell)}: training \d+ steps, resuming from", log), log[-3000:]
    trials = optuna.load_study(study_name="lit_mpdit-smoke", storage=storage).get_trials()
    states = sorted((t.state.name, t.params.get("cell")) for t in trials)
    assert states == [("COMPLETE", cell), ("FAIL", cell)], states
    (retry,) = [t for t in trials if t.state.name == "COMPLETE"]
    assert retry.system_attrs["failed_trial"] == next(t.number for t in trials if t.state.name == "FAIL")
    table = fid_table(out)
    assert len(table) == 1 and table.fid.notna().all()
