"""Exact resume: a run stopped at step k and resumed from its checkpoint ends where an uninterrupted run ends —
weights, EMA, optimizer, learning-rate schedule, random streams and data order mid-epoch included."""
import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from lit_mpdit.data import FashionMNISTSampleDataModule
from lit_mpdit.module import DiffusionModule


class LossLog(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()


def fit(tmp, max_steps, ckpt_path=None):
    L.seed_everything(0, verbose=False)
    data = FashionMNISTSampleDataModule(batch_size=16, val_size=16, limit_train=80)  # 5 batches an epoch
    model = DiffusionModule(size="T/4", mp="E", warmup_steps=4, decay_steps=6)  # the schedule moves every step
    log, ema = LossLog(), EMAWeightAveraging(decay=0.9)
    ckpt = ModelCheckpoint(dirpath=tmp, every_n_train_steps=7, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[log, ema, ckpt],
    )  # fmt: skip
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, ema, log.losses


def test_resume_mid_epoch_continues_exactly(tmp_path):
    whole, whole_ema, whole_losses = fit(tmp_path / "a", 12)
    fit(tmp_path / "b", 7)  # stopped at step 7, in the middle of the second epoch
    resumed, resumed_ema, resumed_losses = fit(tmp_path / "c", 12, ckpt_path=str(tmp_path / "b" / "step=7.ckpt"))
    assert set(resumed_losses) == set(range(8, 13))
    for step, loss in resumed_losses.items():
        assert abs(loss - whole_losses[step]) <= 1e-6 * abs(whole_losses[step]), step
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    for a, b in zip(whole_ema._average_model.parameters(), resumed_ema._average_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
