"""DDP on CPU: two processes of batch B train exactly as one process of batch 2B (slow: `make test-slow`).

Each rank draws the random numbers of the whole global batch and keeps its part, every process starts that
stream from the seed (Lightning's DDP re-seeds its processes; the module does the same alone), and the
sampler hands rank r the r-th half of every global batch, so the only difference left is the order of the
float sums in the gradient all-reduce."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "fmnist.yaml")
STEPS, LR = 6, 1e-2
pytestmark = pytest.mark.slow


def fit(cwd: Path, devices: int, batch: int) -> tuple[dict, pd.Series]:
    """The last checkpoint and the logged training loss per step of a short CLI run."""
    cwd.mkdir()
    args = [
        "--config", CONFIG, "--data", "lit_mpdit.data.FashionMNISTSampleDataModule", "--data.val_size", "32",
        "--data.batch_size", str(batch), "--model.size", "T/4", "--model.mp", "E", "--model.conditioning", "rotation+scale",
        "--model.lr", str(LR), "--model.warmup_steps", "0",  # full-size steps from the first: trajectories part fast
        "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "1",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
    ]  # fmt: skip
    if devices > 1:
        args += ["--trainer.strategy", "ddp"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    proc = subprocess.run([sys.executable, "-m", "lit_mpdit", "fit", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (last,) = cwd.glob("results/runs/**/last.ckpt")
    (metrics,) = cwd.glob("results/runs/**/metrics.csv")
    losses = pd.read_csv(metrics).dropna(subset=["train/loss"]).set_index("step")["train/loss"]
    return torch.load(last, map_location="cpu", weights_only=False), losses


def test_ddp_on_two_cpu_processes_matches_one_process_with_the_global_batch(tmp_path):
    one, one_losses = fit(tmp_path / "one", devices=1, batch=16)
    two, two_losses = fit(tmp_path / "two", devices=2, batch=8)
    assert one["global_step"] == two["global_step"] == STEPS
    # Every step's loss (the mean over both ranks under DDP): the same batches, timesteps, noise and weights.
    assert len(one_losses) == STEPS
    pd.testing.assert_series_equal(two_losses, one_losses, rtol=1e-5)
    # Adam moves every weight by about LR per step, whatever its gradient: runs that drew different noise
    # differ by ~LR after a few steps. The all-reduce's summation order changes the gradients by ~1e-6
    # relative, which reaches the weights as ~1e-6 absolute (a few float32 ulps at |w| ~ 4); 1e-5 is
    # 1/6000 of the distance the weights travel.
    for key in ("current_model_state", "state_dict"):  # the trained weights and their EMA
        assert one[key].keys() == two[key].keys()
        for name, value in one[key].items():
            torch.testing.assert_close(two[key][name], value, rtol=0, atol=1e-5, msg=f"{key}.{name}")
    moments = [state["exp_avg"] for state in two["optimizer_states"][0]["state"].values()]
    assert sum(m.abs().sum().item() for m in moments) > 0  # it trained: the weights compared are not the initial ones
