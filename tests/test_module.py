"""The LightningModule: a real tiny fit whose loss falls, optimizer presets per family, non-finite losses stop."""
import math

import lightning as L
import pytest
import torch

from lit_mpdit.callbacks import MagnitudeDiagnostics, Throughput
from lit_mpdit.data import FashionMNISTSampleDataModule
from lit_mpdit.errors import ConfigError
from lit_mpdit.module import DiffusionModule, NonFiniteLossError, lr_factor


def trainer(**kw) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**(defaults | kw))


class LossLog(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


@pytest.mark.parametrize("mp", [pytest.param("A", marks=pytest.mark.slow), "E"])  # the MP fit, the more fragile, by default
def test_tiny_fit_on_fashion_mnist_sample_lowers_the_loss(mp, all_cores):
    L.seed_everything(0)
    data = FashionMNISTSampleDataModule(batch_size=64, val_size=64)
    model = DiffusionModule(size="T/4", mp=mp, lr=1e-3 if mp == "A" else None, warmup_steps=10 if mp == "E" else None)
    log = LossLog()
    trainer(max_steps=80, limit_val_batches=0, callbacks=[log]).fit(model, datamodule=data)
    first, last = sum(log.losses[:10]) / 10, sum(log.losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_presets_follow_the_family():
    a, e = DiffusionModule(size="T/4", mp="A"), DiffusionModule(size="T/4", mp="E")
    assert (a.preset().algorithm, a.preset().lr) == ("adamw", 1e-4)
    assert (e.preset().algorithm, e.preset().lr, e.preset().betas) == ("adam", 1e-2, (0.9, 0.99))
    assert DiffusionModule(size="T/4", mp="E", optimizer="standard", lr=3e-4).preset().lr == 3e-4
    opt = e.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)


def test_lr_schedule_warms_up_then_decays_as_inverse_square_root():
    assert lr_factor(0, 100, 1000) == pytest.approx(0.01)
    assert lr_factor(99, 100, 1000) == pytest.approx(1.0)
    assert lr_factor(1000, 100, 1000) == pytest.approx(1.0)
    assert lr_factor(4000, 100, 1000) == pytest.approx(0.5)
    assert lr_factor(5000, 0, None) == 1.0


@pytest.mark.parametrize("mp", ["A", "E"])
def test_paper_preset_schedule_is_the_formula_at_every_run_length(mp):
    # map-dit's train.py: lr ∝ min(1, (s + 1)/(N/150)) until N/10, then 1/√(s/(N/10)); Adam (0.9, 0.99).
    module = DiffusionModule(size="T/4", mp=mp, optimizer="paper")
    peak = 1e-2 if mp == "E" else 1e-4
    for n in (300, 3000, 400_000):
        module.run_steps = lambda n=n: n
        opt = module.configure_optimizers()
        factor = opt["lr_scheduler"]["scheduler"].lr_lambdas[0]
        warmup, decay = n // 150, n // 10
        assert module.schedule(n) == (warmup, decay)
        for step, expected in ((0, 1 / warmup), (warmup, 1.0), (decay, 1.0), (n, 1 / math.sqrt(n / decay))):
            assert opt["optimizer"].defaults["lr"] * factor(step) == pytest.approx(peak * expected), (n, step)
        assert isinstance(opt["optimizer"], torch.optim.Adam) and opt["optimizer"].defaults["betas"] == (0.9, 0.99)
    assert DiffusionModule(size="T/4", mp=mp, optimizer="paper", warmup_steps=7).schedule(3000) == (7, 300)  # in steps


class GradNorm(L.Callback):
    """The total gradient norm the optimizer stepped with (gradients survive until the next backward)."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())


@pytest.mark.parametrize("optimizer, clipped, precision", [("paper", True, "bf16-mixed"), ("paper", True, "32-true"), ("auto", False, "bf16-mixed")])
def test_paper_preset_clips_the_gradient_norm_at_a_tenth(optimizer, clipped, precision, all_cores):
    L.seed_everything(0)
    data = FashionMNISTSampleDataModule(batch_size=32, val_size=32)
    model = DiffusionModule(size="T/4", mp="A", optimizer=optimizer)
    norms = GradNorm()
    fit = trainer(max_steps=4, limit_val_batches=0, callbacks=[norms], precision=precision)
    fit.fit(model, datamodule=data)
    assert (max(norms.norms) <= 0.1 * (1 + 1e-4)) == clipped, norms.norms
    assert fit.optimizers[0].defaults["fused"]  # clipped or not: no gradient scaler on a CPU, so one kernel per step


def test_non_finite_loss_stops_the_run_with_a_clear_message():
    data = FashionMNISTSampleDataModule(batch_size=16, val_size=16)
    model = DiffusionModule(size="T/4", mp="A")
    with torch.no_grad():
        model.net.final.proj.weight.fill_(math.inf)
    with pytest.raises(NonFiniteLossError, match="non-finite training loss .* at step 0"):
        trainer(max_steps=3, limit_val_batches=0).fit(model, datamodule=data)


def test_sampling_gives_images_in_range_and_is_seeded():
    model = DiffusionModule(size="T/4", mp="E", sample_steps=4)
    labels = torch.tensor([0, 1, 2])
    a, b = model.sample(labels, seed=3), model.sample(labels, seed=3)
    assert a.shape == (3, 1, 28, 28) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1


@pytest.mark.parametrize("forced", [True, False])
def test_sampling_after_weights_are_copied_in_through_data_draws_with_the_new_weights(forced):
    """Lightning's EMA callback copies the averaged weights in through `.data`, which no version counter sees:
    the grid a cell drew at the end of its fit with forced weight normalization off was static."""
    torch.manual_seed(0)
    model = DiffusionModule(size="T/4", mp="E", sample_steps=4, flags={"forced_weight_norm": forced})
    other = DiffusionModule(size="T/4", mp="E", sample_steps=4, flags={"forced_weight_norm": forced})
    for p in other.parameters():
        p.data.add_(0.1 * torch.randn_like(p))  # weights of another training state (zero-initialised gains too)
    labels = torch.tensor([0, 1, 2])
    model.sample(labels)  # its own weights, first
    for mine, theirs in zip([*model.parameters(), *model.buffers()], [*other.parameters(), *other.buffers()]):
        mine.data.copy_(theirs.data)  # as WeightAveraging._copy_average_to_current does
    assert torch.equal(model.sample(labels), other.sample(labels))


def test_diagnostics_and_throughput_callbacks_log_every_block():
    data = FashionMNISTSampleDataModule(batch_size=16, val_size=16)
    model = DiffusionModule(size="T/4", mp="E")
    logged = {}

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.update({k: v for k, v in trainer.callback_metrics.items() if k.startswith("diag/")})

    speed = Throughput(skip_steps=1)
    trainer(max_steps=6, limit_val_batches=0, callbacks=[MagnitudeDiagnostics(every_n_steps=2, probe_size=8), speed, Capture()]).fit(model, datamodule=data)
    assert {f"diag/act_rms/block_{i}" for i in range(4)} <= set(logged)
    assert all(0.5 < logged[f"diag/act_rms/block_{i}"] < 2 for i in range(4))  # rung E: near unit RMS
    assert speed.images_per_second and speed.images_per_second > 0


@pytest.mark.parametrize("kwargs, option", [(dict(optimizer="sgd"), "model.optimizer"), (dict(sampler="euler"), "model.sampler"), (dict(class_dropout=1.5), "model.class_dropout")])
def test_bad_module_options_are_refused(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        DiffusionModule(size="T/4", **kwargs)


def test_periodic_fid_is_logged_during_fit(tmp_path, all_cores):
    from lightning.pytorch.loggers import CSVLogger

    from lit_mpdit.callbacks import PeriodicFID

    data = FashionMNISTSampleDataModule(batch_size=16, val_size=16)
    model = DiffusionModule(size="T/4", mp="E", sample_steps=3)
    logger = CSVLogger(tmp_path, name="", version="")
    fid = PeriodicFID(every_n_steps=2, n_fake=8, n_ref=16, steps=2)  # Inception: the machine's fast path (auto)
    trainer(max_steps=4, limit_val_batches=0, logger=logger, callbacks=[fid]).fit(model, datamodule=data)
    import pandas as pd

    logged = pd.read_csv(tmp_path / "metrics.csv").dropna(subset=["val/fid"])
    assert list(logged.step) == [2, 4]
    assert (logged["val/fid"] > 0).all() and logged["val/fid"].map(math.isfinite).all()
    assert fid.seconds > 0


def test_periodic_fid_can_leave_the_last_step_to_a_final_evaluation(tmp_path, all_cores):
    from lightning.pytorch.loggers import CSVLogger

    from lit_mpdit.callbacks import PeriodicFID

    data = FashionMNISTSampleDataModule(batch_size=16, val_size=16)
    logger = CSVLogger(tmp_path, name="", version="")
    fid = PeriodicFID(every_n_steps=2, n_fake=8, n_ref=16, steps=2, skip_last=True)
    trainer(max_steps=4, limit_val_batches=0, logger=logger, callbacks=[fid]).fit(DiffusionModule(size="T/4", sample_steps=3), datamodule=data)
    import pandas as pd

    assert list(pd.read_csv(tmp_path / "metrics.csv").dropna(subset=["val/fid"]).step) == [2]


@pytest.mark.parametrize(("compile", "mode"), [(True, "default"), ("default", "default"), ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"), (False, "eager")])
def test_model_compile_takes_true_or_a_torch_compile_mode(monkeypatch, compile, mode):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda net, **kwargs: seen.append(kwargs) or net)
    DiffusionModule(size="T/4", input_size=8, compile=compile)
    assert seen == ([] if mode == "eager" else [{"dynamic": False, "mode": mode}])


@pytest.mark.slow
@pytest.mark.parametrize("mp", ["A", "E"])
def test_compiled_training_pass_matches_the_eager_one_and_sampling_stays_eager(mp):
    import copy

    from torch._dynamo.utils import counters

    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    modules = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        modules[compiled] = DiffusionModule(size="T/4", conditioning="rotation+scale", mp=mp, input_size=8, compile=compiled).train()
    assert modules[True].state_dict().keys() == modules[False].state_dict().keys()
    for step in range(2):  # the second step sees the weights the first one's forced normalization rewrote
        losses = {c: m.losses(x, y, generator=torch.Generator().manual_seed(step))["loss"] for c, m in modules.items()}
        torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)
        for m in modules.values():
            m.net.zero_grad()
        for loss in losses.values():
            loss.backward()
        eager, compiled = dict(modules[False].net.named_parameters()), dict(modules[True].net.named_parameters())
        for name, p in compiled.items():
            torch.testing.assert_close(p, eager[name], rtol=1e-5, atol=1e-6)
            if p.requires_grad:
                torch.testing.assert_close(p.grad, eager[name].grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        with torch.no_grad():
            for m in modules.values():
                for p in m.net.parameters():
                    p.sub_(1e-2 * p.grad)
    frames = counters["stats"]["unique_graphs"]
    modules[True].sample(torch.arange(3), steps=2)  # eval mode, no gradients, another batch: the eager network
    assert counters["stats"]["unique_graphs"] == frames
    twin = copy.deepcopy(modules[True])  # what EMA callbacks do: the copy trains its own weights
    with torch.no_grad():
        for p in twin.net.parameters():
            p.zero_()
    assert twin._compiled_net._orig_mod is twin.net


@pytest.mark.slow
@pytest.mark.parametrize("mp", ["A", "E"])
def test_compiled_sampling_draws_what_eager_sampling_draws_from_the_same_noise(mp):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    module = DiffusionModule(size="T/4", conditioning="rotation+scale", mp=mp, input_size=8)
    with torch.no_grad():  # away from the initialisation's zero output layer, so the network's output matters
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    labels = torch.arange(4)  # one batch either way, so the same noise
    eager = module.sample(labels, steps=3, seed=1)
    compiled = module.sample(labels, steps=3, seed=1, compile=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert eager.std() > 0.05  # a real picture of noise, not a constant
    graphs = counters["stats"]["unique_graphs"]
    module.sample(torch.arange(7), steps=2, batch_size=3, compile=True)  # batches 3, 2, 2: new shapes compile
    assert counters["stats"]["unique_graphs"] > graphs
    graphs = counters["stats"]["unique_graphs"]
    module.sample(labels, steps=3, seed=2, compile=True)  # a shape compiled before: its graph is reused
    assert counters["stats"]["unique_graphs"] == graphs
    assert module.training  # sampling leaves the mode it found
