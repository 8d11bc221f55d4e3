"""The command line as a user meets it: bad options refused in one line, a short fit, a sample grid."""
import json
import subprocess
import sys
from pathlib import Path

import lightning  # noqa: F401 - binds its log handler to the session's stderr, not to one in-process test's
import pytest
from PIL import Image

from lit_mpdit.runtime import AUTO, resolve_precision  # the machine's fast Inception path: bf16 only where it is native

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "fmnist.yaml")
SAMPLE_DATA = ["--data", "lit_mpdit.data.FashionMNISTSampleDataModule", "--data.val_size", "32", "--data.batch_size", "16"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lit_mpdit", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(  # one case as a user meets it, in a process of its own; the rest in test_bad_input.py
    "args, expected",
    [(["--model.conditioning", "bogus"], "model.conditioning: unknown strategy 'bogus'; allowed: adaln, shift, scale, rotation, rotation+scale")],
)
def test_bad_options_exit_with_one_clear_line_before_training(tmp_path, args, expected):
    proc = run("fit", "--config", CONFIG, *SAMPLE_DATA, *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results" / "runs").exists()  # nothing trained, nothing written


@pytest.mark.slow  # three processes of their own; every part is also tested in-process in the default suite
def test_fit_then_sample_writes_a_class_per_row_grid(tmp_path):
    proc = run(
        "fit", "--config", CONFIG, *SAMPLE_DATA,
        "--model.size", "T/4", "--model.sample_steps", "3",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = list((tmp_path / "results" / "runs").rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    run_dir = ckpts[0].parents[1]
    assert (run_dir / "samples" / "final.png").exists() and (run_dir / "metrics.csv").exists()
    assert (tmp_path / "results" / "mlflow.db").exists()

    out = tmp_path / "grid.png"
    proc = run("sample", "--ckpt", str(ckpts[0]), "--out", str(out), "--per-class", "3", "--classes", "4", "--steps", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    width, height = Image.open(out).size
    assert (width, height) == (2 * (3 * 30 + 2), 2 * (4 * 30 + 2))  # 3 per row, 4 rows of 28 px + 2 px gaps, ×2

    fid_json = tmp_path / "fid.json"
    proc = run(
        "evaluate", "--ckpt", str(ckpts[0]), "--reference", "fashion_mnist_sample:test", "--n", "8", "--n-ref", "16",
        "--steps", "2", "--sampler", "ddim", "--bootstrap", "10", "--precision", resolve_precision(AUTO, "bf16", "fp32"), "--out", str(fid_json),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(fid_json.read_text())
    assert result["fid"] > 0 and result["fid_lo"] <= result["fid"] <= result["fid_hi"]
    protocol = result["protocol"]
    assert (protocol["n_fake"], protocol["n_ref"], protocol["steps"], protocol["sampler"], protocol["weights"]) == (8, 16, 2, "ddim", "ema")
    assert protocol["training_step"] == 4 and protocol["reference"] == "fashion_mnist_sample:test"

    # The other two LightningCLI subcommands on the default config: test reports the diffusion losses of the
    # test split, predict writes the images it drew (an .npz and a class-per-row grid).
    tiny = [*SAMPLE_DATA, "--model.size", "T/4", "--model.sample_steps", "2", "--trainer.enable_progress_bar", "false"]
    proc = run("test", "--config", CONFIG, *tiny, "--ckpt_path", str(ckpts[0]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test/loss" in proc.stdout
    proc = run("predict", "--config", CONFIG, *tiny, "--model.predict_per_class", "2", "--ckpt_path", str(ckpts[0]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = list((tmp_path / "results" / "runs").rglob("predictions.npz"))
    assert len(written) == 1 and (written[0].parent / "predictions.png").exists()
    import numpy as np

    predictions = np.load(written[0])
    assert predictions["images"].shape == (20, 28, 28, 1) and predictions["images"].dtype == np.uint8
    assert list(predictions["labels"]) == [c for c in range(10) for _ in range(2)]

    # Resuming with an option the checkpoint contradicts is refused, not silently dropped.
    proc = run("fit", "--config", CONFIG, *tiny, "--model.conditioning", "rotation", "--ckpt_path", str(ckpts[0]), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.conditioning: 'rotation' contradicts the checkpoint given by --ckpt_path, which left it unset (its default)" in proc.stderr


def test_sample_refuses_a_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    proc = run("sample", "--ckpt", str(bad), "--out", str(tmp_path / "x.png"), cwd=tmp_path)
    assert proc.returncode == 2 and "is not a readable lit_mpdit checkpoint" in proc.stderr and "Traceback" not in proc.stderr


FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


def truncated_fashion_mnist(folder: Path) -> list[str]:
    if not FMNIST_SYSTEM.is_dir():
        pytest.skip(f"needs {FMNIST_SYSTEM} (apt-get install dataset-fashion-mnist)")
    folder.mkdir()
    for path in FMNIST_SYSTEM.glob("*.gz"):
        (folder / path.name).write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ["--data.root", str(folder), "--data.download", "false"]


# Unwritable folders are made under a regular file: chmod does not stop root, who runs these tests in CI.
MLFLOW_UNDER_A_FILE = {"class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": {"tracking_uri": "sqlite:///a_file/mlflow.db"}}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing dataset", "Fashion-MNIST not found: looked for train-images-idx3-ubyte.gz"),
        ("truncated dataset", "-ubyte.gz: truncated or corrupt"),
        ("unwritable results folder", "--trainer.default_root_dir: cannot write to"),
        ("unwritable MLflow folder", "--trainer.logger MLFlowLogger.tracking_uri: cannot write to"),
        ("corrupt checkpoint", "bad.ckpt is not a readable lit_mpdit checkpoint"),
    ],
)
def test_bad_inputs_exit_with_one_clear_error_and_leave_results_untouched(tmp_path, monkeypatch, capsys, case, expected):
    import lit_mpdit.cli

    monkeypatch.chdir(tmp_path)  # the config writes to ./results
    monkeypatch.setattr(sys, "argv", ["lit_mpdit"])  # LightningCLI warns about arguments beside pytest's own
    monkeypatch.setattr(lit_mpdit.cli, "keep_freed_memory", lambda: None)  # a setting for training processes
    results = tmp_path / "results"
    results.mkdir()
    (results / "earlier.json").write_text('{"fid": 1.0}')
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 truncated")
    args = {
        "missing dataset": lambda: ["--data.root", str(tmp_path / "empty"), "--data.download", "false"],
        "truncated dataset": lambda: truncated_fashion_mnist(tmp_path / "truncated"),
        "unwritable results folder": lambda: [*SAMPLE_DATA, "--trainer.default_root_dir", str(tmp_path / "a_file" / "runs")],
        "unwritable MLflow folder": lambda: [*SAMPLE_DATA, "--config", json.dumps({"trainer": {"logger": [MLFLOW_UNDER_A_FILE]}})],
        "corrupt checkpoint": lambda: [*SAMPLE_DATA, "--ckpt_path", str(tmp_path / "bad.ckpt")],
    }[case]()
    with pytest.raises(SystemExit) as exit:
        lit_mpdit.cli.main(["fit", "--config", CONFIG, *args, "--trainer.max_steps", "1"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: ") and expected in err.splitlines()[0], err[-3000:]
    assert [p.name for p in results.iterdir()] == ["earlier.json"] and (results / "earlier.json").read_text() == '{"fid": 1.0}'


def test_the_default_config_trains_the_recipe_of_a_committed_grid_cell(tmp_path):
    """`make fit` trains what the cpu grid measured (its adaln-A cell): the two cannot drift apart again."""
    import yaml

    from lit_mpdit.config import model_design

    proc = run("fit", "--config", CONFIG, "--print_config", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    default = yaml.safe_load(proc.stdout)
    cell = yaml.safe_load((ROOT / "results/ablations/cpu/cells/adaln-A-s0/config.yaml").read_text())
    design = ("conditioning", "mp", "variant", "norm", "flags")  # unset in the config: the defaults name the same model
    same = lambda section: {k: v for k, v in section.items() if k not in design}  # noqa: E731
    assert same(default["model"]) == same(cell["model"])
    assert model_design(**{k: default["model"][k] for k in design}) == model_design(**{k: cell["model"][k] for k in design})
    data = ("batch_size", "val_size", "limit_train", "seed")
    assert default["data"]["class_path"] == cell["data"]["class_path"]
    assert {k: default["data"]["init_args"][k] for k in data} == {k: cell["data"]["init_args"][k] for k in data}
    steps = ("max_steps", "val_check_interval", "limit_val_batches", "accumulate_grad_batches", "gradient_clip_val")
    assert {k: default["trainer"][k] for k in steps} == {k: cell["trainer"][k] for k in steps}
    assert default["trainer"]["precision"] == AUTO and cell["trainer"]["precision"] in ("bf16-mixed", "32-true")  # the cell: auto, resolved
    ema = lambda config: next(c["init_args"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EMAWeightAveraging"))  # noqa: E731
    assert ema(default) == ema(cell)
    assert default["seed_everything"] == cell["seed_everything"]


def test_the_untrained_model_is_built_without_lightnings_device_banners(caplog):
    import logging

    from lit_mpdit.cli import untrained_module

    caplog.set_level(logging.INFO)  # Lightning prints its banners through logging (to stderr outside pytest)
    module = untrained_module(str(ROOT / "configs" / "fmnist.yaml"))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert module.hparams.size == "T/4" and "GPU available" not in said and "litlogger" not in said
