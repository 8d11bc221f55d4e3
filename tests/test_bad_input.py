"""Bad input across the subcommands: one line naming the option, exit code 2, no traceback, nothing written.

In-process (one import of torch and Lightning for the whole table) through the same entry points as
`python -m lit_mpdit` and `python -m ablations.sweep`.
"""
import os
from pathlib import Path

import lightning  # noqa: F401 - binds its log handler to the session's stderr, not to one in-process test's
import pytest

from ablations.sweep import main as sweep_main
from lit_mpdit.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "fmnist.yaml")
FIT = ["fit", "--config", CONFIG, "--data", "lit_mpdit.data.FashionMNISTSampleDataModule", "--model.size", "T/4"]

CASES = [
    (FIT + ["--trainer.max_steps", "-5"], "--trainer.max_steps: -5 trains nothing"),
    (FIT + ["--trainer.max_steps", "0"], "--trainer.max_steps: 0 trains nothing"),
    (FIT + ["--model.lr", "-1"], "model.lr: -1.0 is out of range; allowed: > 0"),
    (FIT + ["--model.lr", "0"], "model.lr: 0.0 is out of range; allowed: > 0"),
    (FIT + ["--model.num_timesteps", "0"], "model.num_timesteps: 0 is out of range"),
    (FIT + ["--model.sample_steps", "2000"], "model.sample_steps: 2000 is out of range; allowed: ≥ 1 and ≤ 1000"),
    (FIT + ["--model.guidance", "-2"], "model.guidance: -2.0 is out of range; allowed: ≥ 0"),
    (FIT + ["--model.variant", "bogus"], "model.variant: unknown value 'bogus'; allowed: 'old-mod_opts/adaln'"),
    (FIT + ["--model.flags", "{gate: wobble}"], "model.mp gate: unknown value 'wobble'; allowed: 'scalar', 'one_plus', 'rotation'"),
    (FIT + ["--trainer.precision", "16-mixed"], "--trainer.precision: 16-mixed needs a GPU"),
    (["sample", "--ckpt", "none.ckpt", "--steps", "0"], "--steps: 0 is out of range; allowed: ≥ 1"),
    (["sample", "--ckpt", "none.ckpt", "--per-class", "0"], "--per-class: 0 is out of range"),
    (["sample", "--ckpt", "none.ckpt", "--guidance", "-1"], "--guidance: -1.0 is out of range"),
    (["evaluate", "--ckpt", "none.ckpt", "--bootstrap", "-1"], "--bootstrap: -1 is out of range; allowed: ≥ 0"),
    (["evaluate", "--ckpt", "none.ckpt", "--steps", "0"], "--steps: 0 is out of range"),
    (["fid", "fashion_mnist_sample:test", "fashion_mnist_sample:train", "--bootstrap", "-5"], "--bootstrap: -5 is out of range"),
    (["fid", "fashion_mnist_sample:test", "fashion_mnist_sample:train", "--batch-size", "0"], "--batch-size: 0 is out of range"),
]
SWEEP_CASES = [
    (["--mode", "tpe", "--n-trials", "-1"], "--n-trials: a positive number of trials for --mode tpe, got -1"),
    (["--mode", "tpe", "--n-trials", "0"], "--n-trials: a positive number of trials for --mode tpe, got 0"),
    (["--mode", "grid", "--n-trials", "5"], "--n-trials: a positive number of trials for --mode tpe, got 5 with --mode grid"),
    (["--lr", "-1"], "--lr: a positive learning rate for --mode grid"),
    (["--compare", "nowhere"], "--compare: no finished sweep in nowhere"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with earlier results in it, which no bad invocation may touch."""
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "results" / "runs" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "metrics.csv").write_text("step,loss\n1,0.5\n")
    return tmp_path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def refused(entry, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        entry(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[len(FIT) :] if a[0] == "fit" else a) for a, _ in CASES])
def test_bad_input_is_one_line_naming_the_option(workdir, capsys, argv, message):
    before = snapshot(workdir)
    err = refused(cli_main, argv, capsys)
    assert f"error: {message}" in err, err[-2000:]
    assert snapshot(workdir) == before  # nothing written, nothing changed


@pytest.mark.parametrize("argv, message", SWEEP_CASES, ids=[" ".join(a) for a, _ in SWEEP_CASES])
def test_bad_sweep_input_is_one_line_naming_the_option(workdir, capsys, argv, message):
    before = snapshot(workdir)
    err = refused(sweep_main, ["--profile", "smoke", "--out", str(workdir / "sweep"), *argv], capsys)
    assert f"error: {message}" in err, err[-2000:]
    assert snapshot(workdir) == before and not os.path.exists(workdir / "sweep")
