"""`make bench` on a tiny setting: every configuration measured, every target computed, both reports written."""
import json
import sys

import pytest
import torch
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run as bench  # noqa: E402

from lit_mpdit.conditioning import NAMED_STRATEGIES  # noqa: E402


@pytest.mark.slow  # every strategy at both rungs built and timed: `make bench`'s own check
def test_bench_measures_every_configuration_and_target(tmp_path, all_cores):
    report = bench.main(["--settings", "T/4 tiny", "--rounds", "1", "--precisions", "fp32", "bf16-mixed", "--fid-n", "0", "--cell", "", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "latest.json").read_text()) == json.loads(json.dumps(report))
    configs = {(r["conditioning"], r["mp"], r["precision"], r["gains"]) for r in report["rows"]}
    expected = {(c, mp, p, "per_head") for c in NAMED_STRATEGIES for mp in bench.RUNGS for p in bench.PRECISIONS}
    assert configs == expected | {(c, "E", p, "shared") for c in NAMED_STRATEGIES for p in bench.PRECISIONS}
    for row in report["rows"]:
        assert row["train_step_s"] > 0 and row["fraction_of_peak"] > 0 and row["train_memory_mb"] > row["params"] * 16 / 2**20
        if row["precision"] == "fp32" or bench.native_bf16():  # an emulated bf16's peak is a small product's, not a bound
            assert row["fraction_of_peak"] < 1.5
        assert row["train_gflops_per_step"] > 2 * row["forward_gflops_per_image"] * row["batch"]  # backward ≈ 2 forwards
    kinds = {t["target"] for t in report["targets"]}
    assert {"rotation+scale / adaln step time", "rung E / rung A step time", "bf16-mixed speed-up over fp32", "per-head gains / one shared gain step time"} <= kinds
    bounds = [t["flop_bound"] for t in report["targets"] if "flop_bound" in t]
    assert bounds and all(0.9 < b < 1 for b in bounds)  # rotation+scale does fewer FLOPs, by its smaller heads only
    assert "| rung E / rung A step time |" in (tmp_path / "latest.md").read_text()
    assert report["fresh_42mb_tensor"]["kept_memory"] == sys.platform.startswith("linux")


def test_where_the_cpu_emulates_bf16_the_benches_time_fp32_and_say_what_bounds_bf16(monkeypatch):
    monkeypatch.setattr(bench, "native_bf16", lambda: False)
    assert bench.default_precisions() == ["fp32"]
    header = {**bench.run_header("run.py", []), "cpu_capability": "AVX2"}
    note = " ".join(bench.bf16_note(header, ["fp32"], {"fp32": 101.3, "bf16": 0.9}))
    assert "bf16-mixed not timed: this CPU (AVX2) has no native bf16" in note and "0.9 GFLOP/s against 101 in fp32" in note
    assert bench.bf16_note(header, ["fp32", "bf16-mixed"], {"fp32": 1.0, "bf16": 2.0}) == []
    monkeypatch.setattr(bench, "native_bf16", lambda: True)
    assert bench.default_precisions() == list(bench.PRECISIONS)


@pytest.mark.slow  # a sampler, the Inception and the bootstraps timed over rounds: a minute on two cores
@pytest.mark.parametrize("native", [True, False])  # True: bf16 (emulated on CPUs without it) and a compile
def test_the_evaluation_bench_times_every_part_and_its_two_bootstraps_agree(tmp_path, monkeypatch, native):
    import bench_eval

    monkeypatch.setattr(bench_eval, "default_precisions", lambda: ["fp32", "bf16-mixed"] if native else ["fp32"])
    compile = [] if native else ["--no-compile"]  # one compile is enough for the suite's time
    report = bench_eval.main(["--profile", "smoke", "--rounds", "1", *compile, "--out", str(tmp_path)])
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(report))
    assert all(v > 0 for v in report["sampler"]["images_per_s"].values()) and report["inception"]["images_per_s"] > 0
    assert report["bootstrap"]["max_relative_difference"] < 1e-6
    md = (tmp_path / "eval.md").read_text()
    assert "| sampler (T/4" in md
    timed = sorted(report["sampler"]["images_per_s"])
    if native:  # the compiled sampler runs in the faster eager precision
        assert timed in (["bf16", "bf16 compiled", "fp32"], ["bf16", "fp32", "fp32 compiled"]) and report["sampler"]["compile_s"] > 0
        assert report["sampler"]["compiled_speedup"] > 0 and "(torch.compile)" in md
    else:  # no emulated bf16 timed
        assert timed == ["fp32"] and report["sampler"]["compiled_speedup"] is None and "compiled sampling not timed" in md
    assert ("bf16 sampling not timed: this CPU has no native bf16" in md) != native and (report["sampler"]["bf16_speedup"] is None) != native


@pytest.mark.slow
def test_the_compile_bench_times_every_variant_and_computes_the_speed_targets(tmp_path):
    import bench_compile

    modes = ["default", "max-autotune-no-cudagraphs"]
    argv = ["--settings", "T/4 tiny", "--strategies", "adaln", "--rounds", "1", "--precisions", *bench_compile.PRECISIONS, "--modes", *modes]
    report = bench_compile.main([*argv, "--out", str(tmp_path)])
    assert json.loads((tmp_path / "compile.json").read_text()) == json.loads(json.dumps(report))
    variants = {(r["conditioning"], r["mp"], r["precision"], r["mode"]) for r in report["rows"]}
    assert variants == {("adaln", mp, p, m) for mp in bench_compile.RUNGS for p in bench_compile.PRECISIONS for m in ["eager", *modes]}
    assert all(r["step_s"] > 0 and (r["compile_s"] > 0) == r["compiled"] == (r["mode"] != "eager") for r in report["rows"])
    profiled = {(r["mp"], r["mode"]) for r in report["rows"] if r["parts_s"] is not None}  # the profile's precision, eager and the first mode
    assert profiled == {(mp, m) for mp in bench_compile.RUNGS for m in ("eager", "default")}
    for r in report["rows"]:
        if r["parts_s"] is not None:
            assert set(r["parts_s"]) == set(bench_compile.PARTS) and r["parts_s"]["matrix products"] > 0
            assert (r["parts_s"]["fused kernels (inductor)"] > 0) == r["compiled"]  # only a compiled step runs inductor's kernels
    assert {t["target"] for t in report["targets"]} == set(bench_compile.TARGETS)
    cells = [t for t in report["targets"] if t["target"] == "cpu profile's training / eager fp32, compile included"]
    assert len(cells) == 2 * len(modes) and all((t["bound"] is not None) == ("max-autotune" not in t["where"]) for t in cells)
    assert all(t["bound"] >= t["value"] for t in cells if t["bound"] is not None)  # nothing but the matrix products can be faster
    md = (tmp_path / "compile.md").read_text()
    assert "| cpu profile's training / eager fp32, compile included |" in md and "| matrix products | attention |" in md


def test_the_reference_bench_refuses_a_folder_without_dits_code_before_work(tmp_path, capsys):
    import bench_reference

    with pytest.raises(SystemExit) as exit_:
        bench_reference.main(["--dit", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "--dit: " in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_stand_ins_for_timms_layers_compute_attention_and_patches_as_defined(tmp_path):
    """DiT's models.py runs on them (bench_reference): a patch is a strided convolution, attention is softmax(qkᵀ/√d)v."""
    import bench_reference

    torch.manual_seed(0)
    embed = bench_reference.PatchEmbed(8, 4, 3, 16)
    x = torch.randn(2, 3, 8, 8)
    first = x[:, :, :4, :4].reshape(2, -1) @ embed.proj.weight.reshape(16, -1).T + embed.proj.bias
    torch.testing.assert_close(embed(x)[:, 0], first)
    assert embed.num_patches == 4 and embed.patch_size == (4, 4)
    attn, tokens = bench_reference.Attention(16, num_heads=2, qkv_bias=True), torch.randn(2, 5, 16)
    q, k, v = attn.qkv(tokens).reshape(2, 5, 3, 2, 8).unbind(2)
    heads = [torch.softmax(q[..., h, :] @ k[..., h, :].transpose(1, 2) / 8**0.5, -1) @ v[..., h, :] for h in range(2)]
    torch.testing.assert_close(attn(tokens), attn.proj(torch.cat(heads, -1)))


def test_a_cheaper_protocol_agrees_only_inside_the_references_interval_on_every_checkpoint(tmp_path, monkeypatch):
    import bench_eval

    fids = {("a.ckpt", "ddpm", False): (60.0, 58.0, 62.0), ("a.ckpt", "ddpm", True): (61.0, 59.0, 63.0), ("a.ckpt", "dpm++2m", False): (57.5, 55.0, 60.0),
            ("b.ckpt", "ddpm", False): (80.0, 78.0, 82.0), ("b.ckpt", "ddpm", True): (79.0, 77.0, 81.0), ("b.ckpt", "dpm++2m", False): (79.0, 77.0, 81.0)}  # fmt: skip
    seconds = {"ddpm": 100.0, "dpm++2m": 20.0}

    def fake_evaluate(module, name, images, protocol):
        fid, lo, hi = fids[module, protocol.sampler, protocol.compile]
        spent = seconds[protocol.sampler] * (0.5 if protocol.compile else 1)
        return {"fid": fid, "fid_lo": lo, "fid_hi": hi, "seconds": {"reference": 5.0, "sampling": spent - 10, "total": 5.0 + spent}}

    monkeypatch.setattr(bench_eval, "evaluate", fake_evaluate)
    monkeypatch.setattr(bench_eval, "load_for_evaluation", lambda ckpt, protocol, snapshots: ckpt)
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "result.json").write_text(json.dumps({"seconds": {"training_steps": 600.0, "fid_curve": 100.0, "final_evaluation": 200.0, "wall": 950.0}}))
    report = bench_eval.protocol_agreement(bench_eval.load_profile("cpu"), ["a.ckpt", "b.ckpt"], ["ddpm:50", "ddpm:50:compile", "dpm++2m:10"], str(cell))
    summary = {s["protocol"]: s for s in report["summary"]}
    assert summary["ddpm:50"]["agrees"] and summary["ddpm:50:compile"]["agrees"]
    assert not summary["dpm++2m:10"]["agrees"]  # inside on b, 57.5 outside a's [58, 62]
    assert summary["ddpm:50:compile"]["evaluation_time_vs_reference"] == pytest.approx(0.5)
    assert summary["ddpm:50"]["cell_non_training_share"] == pytest.approx(350 / 950)  # as the cell ran
    assert summary["dpm++2m:10"]["cell_non_training_share"] == pytest.approx(1 - 600 / (950 - 300 * 0.8))
    rows = {(r["ckpt"], r["protocol"]): r for r in report["rows"]}
    assert rows["a.ckpt", "dpm++2m:10"]["vs_reference_pct"] == pytest.approx(-100 * 2.5 / 60)
    md = "\n".join(bench_eval.protocol_markdown({"protocols": report, "n_fake": 1000}))
    assert "| dpm++2m:10 | **no** |" in md and "| ddpm:50:compile | yes |" in md


@pytest.mark.parametrize("spec", ["ddpm", "ddpm:x", "ddpm:50:fast", "euler:10"])
def test_a_bad_protocol_is_refused_naming_the_option(spec):
    import bench_eval
    from lit_mpdit.errors import ConfigError

    with pytest.raises(ConfigError, match="--protocols"):
        bench_eval.parse_protocol(spec)
