"""Bad input across the subcommands: one line naming the option, exit code 2, no traceback, nothing written.

In-process (one import of torch and Lightning for the whole table) through the same entry points as
`python -m lit_mpdit` and `python -m ablations.sweep`.
"""
import os
from pathlib import Path

import lightning  # noqa: F401 - binds its log handler to the session's stderr, not to one in-process test's
import pytest
import torch

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
    (FIT + ["--model.mp", "Z"], "model.mp: unknown value 'Z'; allowed: 'A', 'B', 'C', 'D', 'E'"),
    (FIT + ["--model.size", "M/4"], "model.size: unknown size 'M/4'; allowed: T/1"),
    (FIT + ["--model.size", "C/8"], "model.size: patch size 8 does not divide the input size 28; allowed patch sizes: [1, 2, 4]"),
    (FIT + ["--model.norm", "batchnorm"], "model.norm: unknown value 'batchnorm'; allowed: 'layernorm', 'rmsnorm', 'none'"),
    (FIT + ["--model.variant", "bogus"], "model.variant: unknown value 'bogus'; allowed: 'old-mod_opts/adaln'"),
    (FIT + ["--model.flags", "{gate: wobble}"], "model.flags.gate: unknown value 'wobble'; allowed: 'scalar', 'one_plus', 'rotation'"),
    (FIT + ["--model.compile", "fast"], "model.compile: unknown value 'fast'; allowed: 'true', 'false', 'default', "),
    (FIT + ["--trainer.precision", "16-mixed"], "--trainer.precision: 16-mixed needs a GPU"),
    pytest.param(
        FIT + ["--trainer.accelerator", "gpu"], "--trainer.accelerator: gpu asked for, but this machine has no CUDA GPU; allowed here: cpu, auto",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
    ),
    (["sample", "--ckpt", "none.ckpt", "--steps", "0"], "--steps: 0 is out of range; allowed: ≥ 1"),
    (["sample", "--ckpt", "none.ckpt", "--per-class", "0"], "--per-class: 0 is out of range"),
    (["sample", "--ckpt", "none.ckpt", "--guidance", "-1"], "--guidance: -1.0 is out of range"),
    (["evaluate", "--ckpt", "none.ckpt", "--bootstrap", "-1"], "--bootstrap: -1 is out of range; allowed: ≥ 0"),
    (["evaluate", "--ckpt", "none.ckpt", "--steps", "0"], "--steps: 0 is out of range"),
    (["fid", "fashion_mnist_sample:test", "fashion_mnist_sample:train", "--bootstrap", "-5"], "--bootstrap: -5 is out of range"),
    (["fid", "fashion_mnist_sample:test", "fashion_mnist_sample:train", "--batch-size", "0"], "--batch-size: 0 is out of range"),
    # Outputs are probed by writing before the work whose result they would hold (root may write anywhere but /proc, /sys)
    (["sample", "--ckpt", "none.ckpt", "--out", "/proc/x/grid.png"], "--out: cannot write to /proc/x: /proc is not writable"),
    (["sample", "--ckpt", "none.ckpt", "--out", "grid.txt"], "--out: grid.txt has suffix '.txt'; allowed: .png, .jpg"),
    (["evaluate", "--ckpt", "none.ckpt", "--out", "/proc/x/fid.json"], "--out: cannot write to /proc/x: /proc is not writable"),
    (["evaluate", "--ckpt", "none.ckpt", "--weights", "init"], "--weights: unknown value 'init'; allowed: 'ema', 'current', 'posthoc'\n"),
    (["fid", "fashion_mnist_sample:test", "fashion_mnist_sample:train", "--cache-dir", "/proc/x"], "--cache-dir: cannot write to /proc/x"),
    (FIT + ["--trainer.logger", "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: /sys/x}}"], "--trainer.logger CSVLogger.save_dir: cannot write to /sys/x: /sys is not writable"),
    (FIT + ["--trainer.max_steps", "abc"], 'Parser key "trainer.max_steps": Expected a <class \'int\'>. Got value: abc (see python -m lit_mpdit fit --help)'),
    (FIT + ["--bogus", "1"], "unrecognized arguments: --bogus 1 (see python -m lit_mpdit fit --help)"),
    (FIT + ["--model.conditioning", "bogus"], "model.conditioning: unknown strategy 'bogus'; allowed: adaln, shift, scale, rotation, rotation+scale, mpshift (and"),
    (["fitt"], "unknown subcommand 'fitt'; allowed: fit, validate, test, predict, sample, evaluate, fid, prepare-latents"),
]
SWEEP_CASES = [
    (["--mode", "tpe", "--n-trials", "-1"], "--n-trials: a positive number of trials for --mode tpe, got -1"),
    (["--mode", "tpe", "--n-trials", "0"], "--n-trials: a positive number of trials for --mode tpe, got 0"),
    (["--mode", "grid", "--n-trials", "5"], "--n-trials: a positive number of trials for --mode tpe, got 5 with --mode grid"),
    (["--lr", "-1"], "--lr: a positive learning rate for --mode grid"),
    (["--compare", "nowhere"], "--compare: no finished sweep in nowhere"),
    (["--storage", "notaurl"], "--storage: 'notaurl' is not a database URL; allowed: sqlite://..., postgresql://..., mysql://..."),
    (["--storage", "mongodb://x/y"], "--storage scheme: unknown value 'mongodb'; allowed: 'sqlite', 'postgresql', 'mysql'"),
    (["--storage", "sqlite:////proc/x/optuna.db"], "--storage: cannot write to /proc/x"),
    (["--storage", "postgresql://127.0.0.1:1/x"], "--storage: cannot connect to postgresql://127.0.0.1:1/x: "),
    (["--tracking-uri", "bogus://x"], "--tracking-uri scheme: unknown value 'bogus'; allowed: 'sqlite', 'postgresql'"),
    (["--tracking-uri", "sqlite:////proc/x/mlflow.db"], "--tracking-uri: cannot write to /proc/x"),
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


def case_id(case) -> str:
    argv = (case.values if hasattr(case, "values") else case)[0]  # a tuple, or a pytest.param with marks
    return " ".join(argv[len(FIT) :] if argv[0] == "fit" else argv)


@pytest.mark.parametrize("argv, message", CASES, ids=[case_id(c) for c in CASES])
def test_bad_input_is_one_line_naming_the_option(workdir, capsys, argv, message):
    before = snapshot(workdir)
    err = refused(cli_main, argv, capsys)
    assert f"error: {message}" in err, err[-2000:]
    assert err.startswith("error: ") and err.count("\n") == 1, err[-2000:]  # one line: no usage, no seed line
    assert snapshot(workdir) == before  # nothing written, nothing changed


def test_the_top_level_help_lists_every_subcommand_and_each_has_its_own_help(capsys):
    from lit_mpdit.cli import LIGHTNING_COMMANDS, commands

    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"])
    assert exit_.value.code == 0
    listing = capsys.readouterr().out
    for name in [*LIGHTNING_COMMANDS, *commands()]:
        assert f"\n  {name} " in listing
        with pytest.raises(SystemExit) as exit_:
            cli_main([name, "--help"])
        assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_fit_help_shows_the_allowed_values_and_this_suites_data_modules(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in [
        "allowed: adaln, shift, scale, rotation, rotation+scale, mpshift",
        "allowed: A, B, C, D, E",
        "allowed: layernorm, rmsnorm, none",
        "allowed: ddpm, ddim",
        "allowed: auto, standard, mp, paper",
        "final, morph/A, morph/E",
        "lit_mpdit.data.FashionMNISTDataModule",
        "lit_mpdit.data.LatentsDataModule",
    ]:
        assert shown in text, shown


@pytest.mark.parametrize("argv, message", SWEEP_CASES, ids=[" ".join(a) for a, _ in SWEEP_CASES])
def test_bad_sweep_input_is_one_line_naming_the_option(workdir, capsys, argv, message):
    before = snapshot(workdir)
    err = refused(sweep_main, ["--profile", "smoke", "--out", str(workdir / "sweep"), *argv], capsys)
    assert f"error: {message}" in err, err[-2000:]
    assert snapshot(workdir) == before and not os.path.exists(workdir / "sweep")


def test_a_learning_rate_table_of_no_search_is_refused(workdir, capsys):
    from ablations.lr_search import main as lr_search_main

    before = snapshot(workdir)
    err = refused(lr_search_main, ["--profile", "cpu", "--table", "--out", str(workdir / "nowhere")], capsys)
    assert "error: --out: no finished learning-rate cell in" in err and err.count("\n") == 1
    assert snapshot(workdir) == before


def bad_files(folder: Path) -> dict[str, Path]:
    """Files a user might pass by mistake: a foreign checkpoint, latents of the wrong types, broken images."""
    import numpy as np
    import torch

    torch.save({"a": 1}, folder / "foreign.ckpt")
    latents = {"mean": np.zeros((4, 4, 2, 2), np.float32), "std": np.ones((4, 4, 2, 2), np.float32), "labels": np.zeros(4, np.int64),
               "shift": np.zeros(4, np.float32), "scale": np.ones(4, np.float32), "vae": "x"}  # fmt: skip
    np.savez(folder / "int_latents.npz", **{**latents, "mean": np.zeros((4, 4, 2, 2), np.int32)})
    np.savez(folder / "float_labels.npz", **{**latents, "labels": np.zeros(4, np.float32)})
    (folder / "notzip.npz").write_text("hello")
    (folder / "pngs").mkdir()
    (folder / "pngs" / "broken.png").write_bytes(b"\x89PNG not really")
    return {p.stem: p for p in folder.iterdir()}


FILE_CASES = [
    (["fit", "--config", CONFIG, "--ckpt_path", "{foreign}"], "--ckpt_path: {foreign} is not a lit_mpdit checkpoint (it lacks state_dict"),
    (["sample", "--ckpt", "{foreign}"], "--ckpt: {foreign} is not a lit_mpdit checkpoint"),
    (["fit", "--config", CONFIG, "--data", "lit_mpdit.data.LatentsDataModule", "--data.path", "{int_latents}"], "{int_latents}: array 'mean' is int32; allowed: float16"),
    (["fit", "--config", CONFIG, "--data", "lit_mpdit.data.LatentsDataModule", "--data.path", "{float_labels}"], "{float_labels}: labels are float32 (4,); expected integers"),
    (["fid", "{notzip}", "fashion_mnist_sample:test"], "{notzip}: not an .npz of images"),
    (["fid", "{pngs}", "fashion_mnist_sample:test"], "{pngs}/broken.png: not a readable image"),
    (["fid", "fashion_mnist_sample:test", "{notzip}"], "{notzip}: not an .npz of images"),  # read before the first set's features
]


@pytest.mark.parametrize("argv, message", FILE_CASES, ids=[" ".join(a[:1] + a[-1:]) for a, _ in FILE_CASES])
def test_a_bad_input_file_is_one_line_naming_it(workdir, capsys, argv, message):
    files = {k: str(v) for k, v in bad_files(workdir).items()}
    before = snapshot(workdir)
    err = refused(cli_main, [a.format(**files) for a in argv], capsys)
    assert f"error: {message.format(**files)}" in err, err[-2000:]
    assert err.count("\n") == 1 and snapshot(workdir) == before


def test_bf16_on_a_cpu_that_would_emulate_it_warns_before_training(monkeypatch):
    from lit_mpdit import runtime
    from lit_mpdit.cli import check_trainer

    monkeypatch.setattr(runtime, "native_bf16", lambda: False)  # an AVX2-only CPU: bf16 products ran 16x slower
    with pytest.warns(UserWarning, match="--trainer.precision bf16-mixed: this CPU has no native bf16"):
        check_trainer({"precision": "bf16-mixed", "accelerator": "cpu"})
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_trainer({"precision": "bf16-mixed", "accelerator": "cpu"})
        check_trainer({"precision": "32-true", "accelerator": "cpu"})
