"""FID: preprocessing, agreement with a plain scipy computation, the cache, the loaders, the bootstrap, the CLI.

The Inception runs about 20 images/s in bf16 on two cores with native bf16, so every set here is 32 images or
fewer, and torchmetrics' own compute() (about 30 CPU-seconds at 2048 dimensions) runs once, in the CLI test. The
module's network is the fast path of the machine (`FAST`): bf16 where it is native, fp32 where the CPU would
emulate bf16 many times slower; the bf16 path itself is always tested, on four images.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from lit_mpdit.errors import ConfigError
from lit_mpdit.metrics import fid as F
from lit_mpdit.runtime import AUTO, resolve_precision

FAST = resolve_precision(AUTO, "bf16", "fp32")
from lit_mpdit.metrics import frechet
from conftest import every_core

SAMPLE = Path(__file__).parent / "data" / "fmnist_sample.npz"
N = 32


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula: means, covariances, scipy's matrix square root."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(np.square(a.mean(0) - b.mean(0)).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


@pytest.fixture(scope="module")
def net() -> F.InceptionFeatures:
    return F.InceptionFeatures(FAST)


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    noise = torch.randint(0, 256, (N, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return {
        "test": F.load_images(f"fashion_mnist_sample:test:{N}"),
        "train": F.load_images(f"fashion_mnist_sample:train:{N}"),
        "noise": noise,
    }


@pytest.fixture(scope="module")
def feats(net, images) -> dict[str, torch.Tensor]:
    with every_core():
        return {name: net(x) for name, x in images.items()}


# ---------------------------------------------------------------------------------------------------------
# Preprocessing and the network


def test_tf1_resize_weights_by_hand():
    # 2 → 4: outputs sample the input at 0, 0.5, 1, 1.5 (clamped to the last pixel)
    expected = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]])
    torch.testing.assert_close(F.tf1_bilinear_weights(2, 4).float(), expected)
    torch.testing.assert_close(F.tf1_bilinear_weights(28, 299).sum(dim=1), torch.ones(299, dtype=torch.float64))


def test_tf1_resize_matches_nvidia_grid_sample_resize():
    resample = pytest.importorskip("fid_helper_pytorch._resample_func")  # an independent implementation of TF1's resize
    x = torch.rand(2, 1, 28, 28) * 255
    ours = F.tf1_bilinear_weights(28, 299).float() @ x @ F.tf1_bilinear_weights(28, 299).float().T
    torch.testing.assert_close(ours, resample.nv_bilinear(x, (299, 299)), atol=1e-3, rtol=0)


def test_preprocess_range_and_channels(net):
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 28, 28)
    x = net.preprocess(images)
    assert x.shape == (2, 3, 299, 299)
    assert x[0].unique().tolist() == [-1.0] and x[1].unique().tolist() == [0.9921875]


def test_float_samples_are_rounded_like_saved_pngs(net, images):
    samples = images["test"][:2].float() / 127.5 - 1  # [-1, 1], as a model would give
    torch.testing.assert_close(net(samples), net(images["test"][:2]))


def test_layer_by_layer_fp32_is_the_torchscript_forward(images):
    net = F.InceptionFeatures("fp32")
    x = net.preprocess(images["test"][:2])
    with torch.no_grad():
        assert torch.equal(net.network(x), net.net(x))


def test_features_shape_and_bf16_close_to_fp32(images, feats, all_cores):
    assert feats["test"].shape == (N, 2048) and feats["test"].dtype == torch.float32
    fp32 = F.InceptionFeatures("fp32")(images["test"][:4])
    cosine = torch.nn.functional.cosine_similarity(fp32, F.InceptionFeatures("bf16")(images["test"][:4]), dim=1)
    assert cosine.min() > 0.99


def test_bad_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="precision"):
        F.InceptionFeatures("fp16")


@pytest.mark.parametrize("native", [True, False])
def test_a_protocols_auto_precisions_are_this_machines_and_a_bad_one_names_the_choices(native, monkeypatch):
    from lit_mpdit import runtime
    from lit_mpdit.evaluate import Protocol

    monkeypatch.setattr(runtime, "bf16_pays", lambda: native)
    protocol = Protocol(precision="auto", sample_precision="auto")
    assert (protocol.precision, protocol.sample_precision) == (("bf16", "bf16") if native else ("fp32", "fp32"))
    assert Protocol(precision="fp32", sample_precision="bf16").sample_precision == "bf16"  # a concrete one is kept
    with pytest.raises(ConfigError, match=r"--sample-precision.*'fp32', 'bf16', 'auto'"):
        Protocol(sample_precision="fp16")


# ---------------------------------------------------------------------------------------------------------
# FID


@pytest.mark.parametrize("dims", [256, 24])  # 24 < N: the eigendecomposition branch; 256 > N: the SVD branch
def test_fid_agrees_with_scipy(feats, dims):
    a, b = feats["test"][:, :dims], feats["train"][:, :dims]
    expected = scipy_fid(a.numpy(), b.numpy())
    assert F.fid_from_features(a, b) == pytest.approx(expected, rel=0.01)  # torchmetrics' metric
    assert frechet.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_fid_agrees_with_scipy_at_full_dimension(feats):
    expected = scipy_fid(feats["test"].numpy(), feats["train"].numpy())
    assert F.fid_from_features(feats["test"], feats["train"]) == pytest.approx(expected, rel=0.01)
    assert frechet.frechet_distance(feats["test"], feats["train"]) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero(feats):
    assert abs(frechet.frechet_distance(feats["test"], feats["test"])) < 1e-6
    assert abs(F.fid_from_features(feats["test"][:, :256], feats["test"][:, :256])) < 1e-3


def test_fid_against_noise_is_enormous(feats):
    between_real = frechet.frechet_distance(feats["test"], feats["train"])
    assert frechet.frechet_distance(feats["test"], feats["noise"]) > max(100.0, 3 * between_real)


def test_metric_over_images_holds_the_reference_sums(net, images, feats, all_cores):
    metric = F.fid_metric(net)
    metric.update(images["test"], real=True)
    preloaded = F.fid_metric(net, reference=feats["test"])
    for state in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples"):
        torch.testing.assert_close(getattr(preloaded, state), getattr(metric, state))
    preloaded.update(images["train"][:4], real=False)
    preloaded.reset()  # the real side survives a reset
    assert int(preloaded.real_features_num_samples) == N and int(preloaded.fake_features_num_samples) == 0


@pytest.mark.parametrize("dims", [256, 24])  # fewer and more dimensions than images
def test_resampled_fids_equal_the_direct_formula_on_every_draw(feats, dims):
    real, fake = feats["test"][:, :dims], feats["train"][:, :dims]
    generator = torch.Generator().manual_seed(0)
    draws = [torch.randint(len(fake), (len(fake),), generator=generator) for _ in range(5)] + [torch.arange(len(fake))]
    fast = frechet.resampled_fids(real, fake, draws)
    assert fast == pytest.approx([frechet.frechet_distance(real, fake[idx]) for idx in draws], rel=1e-7)
    assert len(set(fast)) == len(fast)  # the draws differ, and so do their FIDs


@pytest.mark.parametrize("resample_reference", [False, True])
def test_bootstrap_interval_contains_the_estimate(feats, resample_reference):
    point = frechet.frechet_distance(feats["test"], feats["train"])
    lo, hi = frechet.bootstrap_fid(feats["test"], feats["train"], n_boot=50, seed=1, resample_reference=resample_reference)
    assert lo < point < hi
    assert (lo, hi) == frechet.bootstrap_fid(feats["test"], feats["train"], n_boot=50, seed=1, resample_reference=resample_reference)


# ---------------------------------------------------------------------------------------------------------
# Reference cache


def test_reference_cache_hit_miss_and_key_check(net, images, tmp_path, all_cores):
    calls = []

    def images_fn() -> torch.Tensor:
        calls.append(1)
        return images["test"]

    feats = F.reference_features("fashion_mnist_sample:test", images_fn, 8, net=net, cache_dir=tmp_path)
    again = F.reference_features("fashion_mnist_sample:test", images_fn, 8, net=net, cache_dir=tmp_path)
    assert len(calls) == 1 and torch.equal(feats, again) and feats.shape == (8, 2048)
    mu, sigma, n = F.reference_stats("fashion_mnist_sample:test", images_fn, 8, net=net, cache_dir=tmp_path)
    assert len(calls) == 1 and n == 8
    np.testing.assert_allclose(mu, feats.double().mean(0).numpy())
    np.testing.assert_allclose(sigma, np.cov(feats.double().numpy(), rowvar=False))

    path = F.cache_file("fashion_mnist_sample:test", 8, FAST, tmp_path)
    assert path.is_file() and "n8" in path.name and FAST in path.name
    with np.load(path) as stored:
        record = dict(stored)
    np.savez(path, **{**record, "key": np.asarray(F.cache_key("another set", 8, F.protocol(FAST)))})
    F.reference_features("fashion_mnist_sample:test", images_fn, 8, net=net, cache_dir=tmp_path)
    assert len(calls) == 2  # the stored key disagreed: recomputed
    F.reference_features("fashion_mnist_sample:test", images_fn, 6, net=net, cache_dir=tmp_path)
    assert len(calls) == 3  # another N is another entry


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_MPDIT_CACHE", str(tmp_path))
    assert F.default_cache_dir() == tmp_path / "fid"
    monkeypatch.delenv("LIT_MPDIT_CACHE")
    assert F.default_cache_dir() == Path("results/cache/fid")


def test_reference_set_too_small_is_a_config_error(net, images, tmp_path):
    with pytest.raises(ConfigError, match="fewer"):
        F.reference_features("tiny", lambda: images["test"][:2], 4, net=net, cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Loaders


def test_load_folder_gray_and_rgb(images, tmp_path):
    gray, rgb = tmp_path / "gray", tmp_path / "rgb" / "class0"
    gray.mkdir()
    rgb.mkdir(parents=True)
    for i, img in enumerate(images["test"][:3]):
        Image.fromarray(img[0].numpy()).save(gray / f"{i}.png")
        Image.fromarray(img[0].numpy()).convert("RGB").save(rgb / f"{i}.png")
    assert torch.equal(F.load_images(str(gray)), images["test"][:3])
    assert torch.equal(F.load_images(str(tmp_path / "rgb")), images["test"][:3].expand(-1, 3, -1, -1))
    assert len(F.load_images(str(gray), n=2)) == 2


def test_load_npz_forms(images, tmp_path):
    nhwc = images["test"][:4].permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "keyed.npz", labels=np.arange(4), images=nhwc)
    np.savez(tmp_path / "plain.npz", nhwc[..., 0])  # arr_0, N×H×W
    np.savez(tmp_path / "named.npz", samples=nhwc)  # the first array
    for name in ("keyed", "plain", "named"):
        assert torch.equal(F.load_images(str(tmp_path / f"{name}.npz")), images["test"][:4])
    np.savez(tmp_path / "floats.npz", images=nhwc.astype(np.float32))
    with pytest.raises(ConfigError, match="uint8"):
        F.load_images(str(tmp_path / "floats.npz"))


def test_load_dataset_specs():
    assert F.load_images("fashion_mnist_sample:test:10").shape == (10, 1, 28, 28)
    assert F.load_images("fashion_mnist_sample:test").shape == (500, 1, 28, 28)
    with pytest.raises(ConfigError, match="split"):
        F.load_images("fashion_mnist_sample:validation")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed")
def test_load_fashion_mnist_from_the_system_copy():
    assert F.load_images("fashion_mnist:test:5").shape == (5, 1, 28, 28)


@pytest.mark.parametrize("spec", ["no/such/folder", "imagenet:val", "fashion_mnist", "missing.npz"])
def test_unknown_spec_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="accepted"):
        F.load_images(spec)


# ---------------------------------------------------------------------------------------------------------
# Command line (torchmetrics' compute() at full dimension: the one slow step of this file)


def test_cli_prints_one_json_line(feats, tmp_path, capsys, all_cores):
    F.main([f"fashion_mnist_sample:test:{N}", f"fashion_mnist_sample:train:{N}", "--precision", FAST,
            "--bootstrap", "20", "--cache-dir", str(tmp_path)])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["n_real"] == result["n_fake"] == N
    assert result["fid"] == pytest.approx(frechet.frechet_distance(feats["test"], feats["train"]), rel=1e-4)
    assert result["ci95"][0] < result["fid"] < result["ci95"][1]
    assert result["protocol"]["precision"].startswith(FAST) and "2015-12-05" in result["protocol"]["network"]
    assert len(list(tmp_path.glob("*.npz"))) == 2  # both dataset splits went through the reference cache
