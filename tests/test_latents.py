"""prepare-latents: an image folder through a tiny random AutoencoderKL, read back by LatentsDataModule."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_mpdit.data import LatentsDataModule, load_latents
from lit_mpdit.errors import ConfigError
from lit_mpdit.latents import main, prepare_latents

CLASSES = ["bird", "ant"]
PER_CLASS = 5


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    """A randomly initialised AutoencoderKL with one 2× downsampling: 16×16×3 images → 4×8×8 latents."""
    diffusers = pytest.importorskip("diffusers", reason="the latents extra: pip install 'lit_mpdit[latents]'")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir()
        for i in range(PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_round_trip_through_the_datamodule(tiny_vae, images, tmp_path, suffix):
    out = prepare_latents(images, tmp_path / f"latents{suffix}", vae=str(tiny_vae), image_size=16, batch_size=4)
    record = load_latents(out)
    assert record["mean"].shape == record["std"].shape == (2 * PER_CLASS, 4, 8, 8)
    assert (record["std"] > 0).all()
    assert record["labels"].tolist() == [0] * PER_CLASS + [1] * PER_CLASS  # classes sorted: ant, bird
    assert record["class_names"] == sorted(CLASSES) and record["image_size"] == 16
    assert record["vae"] == str(tiny_vae.resolve())

    dm = LatentsDataModule(path=str(out), val_size=2, batch_size=64)
    assert (dm.image_size, dm.in_channels, dm.num_classes) == (8, 4, 2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 4, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    # shift and scale are the dataset's per-channel statistics, so normalized latents are roughly standard
    z = torch.cat([dm.dataset("train").__getitems__(list(range(8)))[0] for _ in range(20)])
    assert z.mean((0, 2, 3)).abs().max() < 0.3 and (z.std((0, 2, 3)) - 1).abs().max() < 0.3


def test_encoding_is_the_vae_posterior(tiny_vae, images, tmp_path):
    from diffusers import AutoencoderKL

    from lit_mpdit.data import load_image, to_unit_range

    out = prepare_latents(images, tmp_path / "z.pt", vae=str(tiny_vae), image_size=16, batch_size=3)
    first = to_unit_range(load_image(images / "ant" / "0.png", 16, 3))[None]
    posterior = AutoencoderKL.from_pretrained(tiny_vae).eval().encode(first).latent_dist
    assert torch.allclose(load_latents(out)["mean"][:1], posterior.mean.detach(), atol=1e-5)


def test_command_line(tiny_vae, images, tmp_path, capsys):
    out = tmp_path / "z.npz"
    main(["--images", str(images), "--out", str(out), "--vae", str(tiny_vae), "--image-size", "16", "--dtype", "float16"])
    assert capsys.readouterr().out.strip() == str(out)
    assert load_latents(out)["mean"].dtype == torch.float16


def test_missing_vae_directory_is_a_config_error(images, tmp_path):
    pytest.importorskip("diffusers", reason="the latents extra: pip install 'lit_mpdit[latents]'")
    with pytest.raises(ConfigError, match="no such directory"):
        prepare_latents(images, tmp_path / "z.pt", vae=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load an AutoencoderKL"):
        prepare_latents(images, tmp_path / "z.pt", vae=str(tmp_path / "empty"))


def test_without_diffusers_says_how_to_install(images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ConfigError, match=r"pip install 'lit_mpdit\[latents\]'"):
        prepare_latents(images, tmp_path / "z.pt", vae=str(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"out": "z.h5"}, "--out: .*z.h5 has suffix '.h5'; allowed: .pt, .npz"), ({"image_size": 0}, "--image-size: 0 is out of range"), ({"dtype": "int8"}, "--dtype"), ({"image_root": "missing"}, "--images")],
)
def test_bad_options_fail_before_encoding(images, tmp_path, kwargs, match):
    args = {"image_root": images, "out": "z.pt"} | kwargs
    with pytest.raises(ConfigError, match=match):
        prepare_latents(tmp_path / args.pop("image_root"), tmp_path / args.pop("out"), vae="/nowhere", **args)


@pytest.fixture(scope="module")
def latents(tiny_vae, images, tmp_path_factory) -> Path:
    return prepare_latents(images, tmp_path_factory.mktemp("latents") / "z.pt", vae=str(tiny_vae), image_size=16, batch_size=4)


def test_samples_decode_through_the_vae_that_encoded_the_training_set(tiny_vae, latents, images):
    from diffusers import AutoencoderKL

    from lit_mpdit.images import to_uint8

    dm = LatentsDataModule(path=str(latents), val_size=2, references={"val": str(images)})
    mean = load_latents(latents)["mean"][:3]
    normalized = (mean - dm.shift.view(-1, 1, 1)) / dm.scale.view(-1, 1, 1)  # as the model learns them
    expected = to_uint8(AutoencoderKL.from_pretrained(tiny_vae).eval().decode(mean).sample.detach())
    decoded = dm.to_images(normalized, batch_size=2)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 3, 16, 16)
    assert (decoded.int() - expected.int()).abs().max() <= 1  # rounding at the uint8 boundary


def test_reference_images_are_the_real_images_cropped_like_the_training_set(latents, images):
    from lit_mpdit.data import load_image

    dm = LatentsDataModule(path=str(latents), val_size=2, references={"val": str(images)})
    every = dm.reference_images("val")
    assert every.shape == (2 * PER_CLASS, 3, 16, 16) and every.dtype == torch.uint8
    assert torch.equal(every[0], load_image(images / "ant" / "0.png", 16, 3))
    assert torch.equal(dm.reference_images("val", 4), LatentsDataModule(path=str(latents), references={"val": str(images)}).reference_images("val", 4))
    from lit_mpdit.data import reference_name

    name = reference_name(dm, "val")  # the FID cache tells reference folders apart
    assert name.startswith("latents:val:images") and name.endswith("-16px") and name != reference_name(LatentsDataModule(path=str(latents), references={"val": str(images / "ant")}), "val")
    with pytest.raises(ConfigError, match="reference split 'test' has none; give data.references.test"):
        dm.reference_images("test", 4)
    with pytest.raises(ConfigError, match="data.references.val: .* is not a directory"):
        LatentsDataModule(path=str(latents), references={"val": str(images / "nowhere")})


def latent_profile(latents: Path, references: dict[str, str]) -> dict:
    """The paper profile's shape (latents, post-hoc EMA, FID against real images) at a few seconds' scale."""
    return {
        "seeds": [0],
        "checkpoint_every": 4,
        "diagnostics_every": 2,
        "fit": {
            "model": {"size": "T/4", "sample_steps": 4},
            "data": {"class_path": "lit_mpdit.data.LatentsDataModule", "init_args": {"path": str(latents), "batch_size": 4, "val_size": 2, "references": references}},
            "trainer": {"max_steps": 8, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 2, "precision": "32-true"},
        },
        "eval": {"reference_split": "val", "n_ref": 10, "n_fake": 6, "steps": 3, "sampler": "ddim", "guidance": 1.5, "weights": "posthoc", "sigma_rel": 0.05, "precision": "fp32", "bootstrap": 0},
    }


def test_a_latent_cell_trains_and_is_scored_on_decoded_samples_with_posthoc_ema(latents, images, tmp_path, capsys, all_cores):
    import math

    from ablations.cells import Cell, check_data, run_cell

    with pytest.raises(ConfigError, match="data.references"):  # refused before any cell, not after training
        check_data(latent_profile(latents, {}))
    profile = latent_profile(latents, {"val": str(images)})
    check_data(profile)
    record = run_cell(profile, Cell("rotation+scale", "E", 0), tmp_path / "cell")
    assert record["status"] == "complete" and math.isfinite(record["fid"]) and record["steps"] == 8
    assert record["protocol"]["weights"] == "posthoc" and record["protocol"]["n_ref"] == 2 * PER_CLASS
    assert sorted(p.name for p in (tmp_path / "cell" / "ema_snapshots").iterdir())  # PowerEMA wrote its snapshots
    grid = np.asarray(Image.open(tmp_path / "cell" / "samples" / "final.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3  # decoded RGB images, not the 4 latent channels

    # The same checkpoint through `evaluate`: its own data module decodes and gives the reference images.
    import json

    from lit_mpdit.cli import evaluate_main

    ckpt = str(tmp_path / "cell" / "checkpoints" / "last.ckpt")
    again = ["--ckpt", ckpt, "--n", "6", "--n-ref", "10", "--steps", "3", "--sampler", "ddim", "--bootstrap", "0", "--weights", "posthoc", "--sigma-rel", "0.05"]
    capsys.readouterr()
    evaluate_main([*again, "--reference", "data:val", "--precision", "fp32"])
    result = json.loads(capsys.readouterr().out)
    assert result["fid"] == pytest.approx(record["fid"], rel=1e-4)  # the sweep's number, reproduced from the checkpoint
    assert result["protocol"]["reference"] == record["protocol"]["reference"]
    with pytest.raises(ConfigError, match="4-channel latents.*--reference data:SPLIT"):
        evaluate_main(again)  # the default pixel reference cannot score latents

    from lit_mpdit.cli import sample_main

    sample_main(["--ckpt", ckpt, "--out", str(tmp_path / "grid.png"), "--per-class", "2", "--steps", "2"])
    assert np.asarray(Image.open(tmp_path / "grid.png")).shape[2] == 3  # decoded RGB, not latent channels


def test_an_image_size_the_vae_cannot_halve_is_refused_before_encoding(tiny_vae, images, tmp_path):
    with pytest.raises(ConfigError, match="--image-size: 15 is not a multiple of 2, the downsampling of"):
        prepare_latents(images, tmp_path / "z.pt", vae=str(tiny_vae), image_size=15, batch_size=4)
    assert not (tmp_path / "z.pt").exists()
