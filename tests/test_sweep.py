"""The ablation sweep: the grid as data, a real smoke sweep that writes every table, resumes without
retraining, and a notebook that regenerates the plots from the tracked runs."""
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from ablations.cells import HERE, Cell, cell_config, grid_cells, load_profile, load_yaml, validate_grid
from ablations.sweep import sweep
from conftest import every_core
from lit_mpdit.conditioning import Conditioning
from lit_mpdit.config import GRID_MP_VALUES, LADDER, PAPER_VARIANTS
from lit_mpdit import build_dit
from lit_mpdit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CELLS = ["adaln-A-s0", "rotation+scale-E-s0"]
LOG_CELLS = ["adaln-A-s0", "adaln-E-s0", "rotation-A-s0"]  # three: an ETA after one cell and after two


def test_claim_cells_come_first_at_their_own_seeds_claim_1_before_claim_2_with_paired_seeds():
    cells = [c.id for c in grid_cells(load_yaml(HERE / "grid.yaml"), seeds=[0], claim_seeds=[0, 1, 2])]
    assert len(cells) == len(set(cells)) == 13 + 2 * 4
    # a grid cut short after six cells decides claim 1 over three seeds; every prefix holds both rungs of a seed
    assert cells[:6] == [f"adaln-{mp}-s{seed}" for seed in (0, 1, 2) for mp in "AE"]
    assert cells[6:12] == [f"rotation+scale-{mp}-s{seed}" for seed in (0, 1, 2) for mp in "AE"]
    assert all(i.endswith("-s0") for i in cells[12:]) and "adaln-B-s0" in cells[12:]
    assert load_profile("cpu")["claim_seeds"] == [0, 1, 2]  # the default grid decides claims over three seeds


def test_the_paper_models_study_trains_every_branch_at_the_claim_seeds_each_seed_together():
    from ablations.cells import study_cells

    cells = study_cells(load_yaml(HERE / "grid.yaml"), "paper_models", seeds=[0], claim_seeds=[0, 1, 2])
    validate_grid(cells)
    assert [c.id for c in cells[:5]] == ["adaln-morph_A-s0", "adaln-morph_E-s0", "adaln-old-mod_opts-s0", "rotation+scale-old-mod_opts-s0", "rotation+mpshift-final-s0"]
    assert [c.seed for c in cells] == [s for s in (0, 1, 2) for _ in range(5)]  # a run cut short holds paired seeds
    from lit_mpdit.config import grid_design

    assert {grid_design(c.conditioning, c.mp)["variant"] for c in cells} == set(PAPER_VARIANTS) - {f"old-mod_opts/{s}" for s in ("shift", "scale", "rotation")}


def test_the_claim_2_seeds_study_holds_eight_paired_seeds_of_both_rung_e_cells_whatever_the_profile():
    from ablations.cells import study_cells

    grid = load_yaml(HERE / "grid.yaml")
    for seeds, claim_seeds in (([0], [0, 1, 2]), ([0, 1], None)):  # its own seeds, not the profile's
        cells = study_cells(grid, "claim2_seeds", seeds=seeds, claim_seeds=claim_seeds)
        assert [c.id for c in cells[:4]] == ["adaln-E-s0", "rotation+scale-E-s0", "adaln-E-s1", "rotation+scale-E-s1"]
        assert [c.seed for c in cells] == [s for s in range(8) for _ in range(2)]
    import ablations.claims as claims

    assert (2, ("adaln", "E"), ("rotation+scale", "E")) in [c[:3] for c in claims.COMPARISONS]  # its row in claims.md


def test_the_paper_models_learning_rate_grids_straddle_each_familys_best():
    from ablations.cells import buildable, grid_flags_of
    from ablations.lr_search import search_spec

    profile, spec = load_profile("cpu"), search_spec("cpu", "paper")
    assert all(buildable(c) for c in spec["cells"])
    for cell in spec["cells"]:  # an octave either side of the ladder's best rate of the same family
        family = grid_flags_of(cell).family
        assert spec[family] == pytest.approx([profile["lr"][family] / 2, profile["lr"][family], profile["lr"][family] * 2])
    with pytest.raises(ConfigError, match="--search: unknown value 'papers'; allowed: 'paper'"):
        search_spec("cpu", "papers")


def test_lr_table_marks_the_best_learning_rate_of_each_cell(tmp_path):
    from ablations.lr_search import lr_folder, lr_table

    for lr, fid in ((1e-3, 120.0), (3e-3, 110.0), (1e-2, 130.0)):
        cell = lr_folder(tmp_path, lr) / "cells" / "adaln-A-s0"
        cell.mkdir(parents=True)
        (cell / "result.json").write_text(json.dumps({"cell": "adaln-A-s0", "lr": lr, "fid": fid, "status": "complete"}))
    for lr, fid in ((1e-3, 140.0), (3e-3, 120.0), (1e-2, 100.0)):  # rung E: still falling at the largest rate
        cell = lr_folder(tmp_path, lr) / "cells" / "adaln-E-s0"
        cell.mkdir(parents=True)
        (cell / "result.json").write_text(json.dumps({"cell": "adaln-E-s0", "lr": lr, "fid": fid, "status": "complete"}))
        (cell / "config.yaml").write_text(f"trainer:\n  precision: {'bf16-mixed' if lr < 1e-2 else '32-true'}\n")
    assert lr_folder(tmp_path, 1.6e-2).name == "lr1.6e-02" != lr_folder(tmp_path, 2e-2).name == "lr2e-02"
    table = lr_table(tmp_path)
    a, e = table[table.cell == "adaln-A-s0"], table[table.cell == "adaln-E-s0"]
    assert list(a.lr) == [1e-3, 3e-3, 1e-2] and list(a.best_for_cell) == [False, True, False] and not a.best_at_edge.any()
    assert list(e.best_for_cell) == [False, False, True] and list(e.best_at_edge) == [False, False, True]
    assert list(e.precision) == ["bf16-mixed", "bf16-mixed", "32-true"] and a.precision.isna().all()  # a search may span machines
    from ablations.lr_search import main

    main(["--profile", "cpu", "--out", str(tmp_path), "--table"])  # no training: the table of what is there
    written = pd.read_csv(tmp_path / "lr_table.csv")
    assert list(written.fid) == list(table.fid) and list(written.best_at_edge) == list(table.best_at_edge)
    assert "| adaln-E-s0 |" in (tmp_path / "lr_table.md").read_text()


def test_lr_search_progress_counts_every_rate_and_takes_its_pace_from_the_search_itself(tmp_path):
    import time

    from ablations.lr_search import finished_runs, lr_folder, progress

    runs = [(cell, lr) for cell in ("adaln-morph_A-s0", "adaln-morph_E-s0") for lr in (4e-3, 8e-3, 1.6e-2)]

    def finish(cell, lr, wall, precision="32-true", **extra):
        folder = lr_folder(tmp_path, lr) / "cells" / cell
        folder.mkdir(parents=True)
        record = {"cell": cell, "lr": lr, "wall_s": wall, "one_time_s": 20.0, "train_precision": precision, **extra}
        (folder / "result.json").write_text(json.dumps(record))

    started = time.time()
    assert progress(tmp_path, runs, {}, started, "32-true").endswith("0/6 cells finished (0 this run), 0 running, 0.0 min elapsed, ETA unknown")
    finish("adaln-morph_A-s0", 4e-3, 1220.0)  # an earlier session's cells: this precision's stand in, marked "~"
    finish("adaln-morph_A-s0", 8e-3, 400.0, precision="bf16-mixed")  # ... another machine's pace does not
    before = finished_runs(tmp_path, runs)
    line = progress(tmp_path, runs, before, started, "32-true")
    assert line.startswith("[lr search] 2/6 cells finished (0 this run)") and line.endswith("ETA ~80 min (earlier runs' pace in 32-true)")
    finish("adaln-morph_A-s0", 1.6e-2, 620.0)  # this run's first cell: its own pace wins
    finish("adaln-morph_E-s0", 4e-3, 9000.0, resumed_from_step=1500)  # a resumed cell's time says nothing of a whole one
    assert progress(tmp_path, runs, before, started, "32-true").endswith("4/6 cells finished (2 this run), 0 running, 0.0 min elapsed, ETA 20 min")


def test_an_lr_searchs_log_is_one_line_of_its_own_per_run_it_trains(tmp_path, monkeypatch, capsys):
    """Each rate's one-cell sweep printed its own "[grid] 0/1 …, ETA unknown" line under the search's, and each
    finished run its "all cells finished" line: the search's log is its own line per run to train, and a last one."""
    import optuna

    import ablations.sweep
    from ablations.cells import grid_flags_of
    from ablations.lr_search import lr_folder, search, search_spec
    from ablations.sweep import cell_grid, run_grid

    trained = []

    def fake_sweep(profile, out, storage, tracking, mode, n_trials, cells, lr, progress=True):
        assert progress is False  # the search's line stands for the sweep's
        folder = out / "cells" / cells[0]
        if not (folder / "result.json").exists():
            trained.append((cells[0], lr))
            folder.mkdir(parents=True)
            (folder / "result.json").write_text(json.dumps({"cell": cells[0], "lr": lr, "fid": 100.0 * lr, "wall_s": 600.0}))

    spec = search_spec("cpu", "paper")
    runs = [(cell, lr) for cell in spec["cells"] for lr in spec[grid_flags_of(cell).family]]
    fake_sweep("cpu", lr_folder(tmp_path, runs[0][1]), None, None, "grid", None, [runs[0][0]], runs[0][1], progress=False)
    trained.clear()  # an earlier session's run
    monkeypatch.setattr(ablations.sweep, "sweep", fake_sweep)
    search("cpu", tmp_path, "paper")
    lines = capsys.readouterr().out.splitlines()
    assert trained == runs[1:] and len(lines) == len(runs) and all(line.startswith("[lr search] ") for line in lines)
    assert lines[0].startswith(f"[lr search] 1/{len(runs)} cells finished (0 this run)") and lines[-1].endswith(", done")

    study = optuna.create_study(sampler=cell_grid(CELLS))
    run_grid(study, lambda trial: float(len(trial.suggest_categorical("cell", CELLS))), CELLS, progress=False)
    assert capsys.readouterr().out == "" and len(study.trials) == len(CELLS)


def test_a_fixed_learning_rate_is_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(ConfigError, match="--lr: a positive learning rate for --mode grid, got 0.001 with --mode tpe"):
        sweep("smoke", tmp_path / "a", None, None, "tpe", None, None, 1e-3)
    with pytest.raises(ConfigError, match="--lr: a positive learning rate"):
        sweep("smoke", tmp_path / "b", None, None, "grid", None, None, -1.0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_grid_holds_the_ladder_and_the_strategies_once_each():
    cells = grid_cells(load_yaml(HERE / "grid.yaml"), seeds=[0, 1])
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids)) == 2 * 13  # 5 rungs of adaln + 4 other strategies × {A, E}
    for rung in "ABCDE":
        assert f"adaln-{rung}-s1" in ids
    for strategy in ["adaln", "shift", "scale", "rotation", "rotation+scale"]:
        assert {f"{strategy}-A-s0", f"{strategy}-E-s0"} <= set(ids)
    assert all(Cell.from_id(i).id == i for i in ids)


@pytest.mark.parametrize("mp", GRID_MP_VALUES)
def test_a_cell_names_a_rung_or_a_branch_of_the_papers_code(mp):
    from lit_mpdit.module import DiffusionModule

    conditioning = {"final": "rotation+mpshift", "old-mod_opts": "rotation+scale"}.get(mp, "adaln")
    cell = Cell(conditioning, mp, 3)
    assert Cell.from_id(cell.id) == cell and "/" not in cell.id  # the id names a folder
    config = cell_config(load_profile("smoke"), cell, Path("/tmp/unused"), None, None, "")
    module = DiffusionModule(**config["model"] | {"size": "T/4", "sample_steps": 10})
    expected = PAPER_VARIANTS.get(f"{mp}/{conditioning}", PAPER_VARIANTS.get(mp, {"conditioning": conditioning}))
    assert module.net.cfg.conditioning == Conditioning.parse(str(expected["conditioning"]))
    if mp not in LADDER:
        assert config["model"]["variant"] == (f"{mp}/{conditioning}" if mp == "old-mod_opts" else mp)
        assert "conditioning" not in config["model"] and "mp" not in config["model"]


def test_a_paper_models_own_learning_rate_wins_over_its_familys():
    profile = load_profile("cpu") | {"lr": {"standard": 8e-3, "mp": 8e-2, "morph/E": 4e-2, "old-mod_opts": 1.6e-1}}
    rate = lambda cell_id: cell_config(profile, Cell.from_id(cell_id), Path("/tmp/unused"), None, None, "")["model"]["lr"]  # noqa: E731
    assert (rate("adaln-morph_E-s0"), rate("rotation+scale-old-mod_opts-s1"), rate("adaln-old-mod_opts-s0")) == (4e-2, 1.6e-1, 1.6e-1)
    assert (rate("adaln-morph_A-s0"), rate("adaln-E-s0"), rate("adaln-E~gate=scalar-s0")) == (8e-3, 8e-2, 8e-2)  # the family's
    assert cell_config(profile, Cell.from_id("adaln-morph_E-s0"), Path("/tmp/unused"), 1e-3, None, "")["model"]["lr"] == 1e-3  # a search's


def test_cells_outside_the_grid_may_name_a_branch_of_the_papers_code(tmp_path):
    from ablations.cells import buildable

    assert buildable("rotation+mpshift-final-s0") and buildable("adaln-morph_E-s1") and buildable("rotation-old-mod_opts-s2")
    assert not buildable("adaln-final-s0") and not buildable("nope-A-s0") and not buildable("adaln-A")
    with pytest.raises(ConfigError, match="--cells: unknown cells \\['adaln-final-s0'\\].*or <conditioning>-<rung or branch: A, B"):
        sweep("smoke", tmp_path / "x", None, None, "grid", None, ["adaln-final-s0"])
    assert not (tmp_path / "x").exists()


def test_a_branch_refuses_a_strategy_it_does_not_build():
    with pytest.raises(ConfigError, match="grid conditioning: final does not build 'adaln'; allowed: rotation\\+mpshift"):
        validate_grid([Cell("adaln", "final", 0)])


@pytest.mark.parametrize("profile", ["smoke", "cpu", "calibration", "paper"])
def test_every_profile_gives_every_cell_the_same_budget(profile):
    p = load_profile(profile)
    assert p["fit"]["trainer"]["max_steps"] > 0 and p["eval"]["n_fake"] >= 2
    assert "conditioning" not in p["fit"]["model"] and "mp" not in p["fit"]["model"]  # only the grid varies


def test_bad_sweep_options_are_refused_before_work(tmp_path):
    with pytest.raises(ConfigError, match="--profile.*allowed: 'smoke', 'cpu', 'cpu_fp32', 'cpu_fixed_optimizer', 'cpu_long', 'calibration', 'paper'"):
        sweep("huge", tmp_path / "a", None, None, "grid", None, None)
    with pytest.raises(ConfigError, match="--cells: unknown cells \\['nope-A-s0'\\]"):
        sweep("smoke", tmp_path / "b", None, None, "grid", None, ["nope-A-s0"])
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="--out: cannot write"):
        sweep("smoke", blocker / "out", None, None, "grid", None, None)
    assert blocker.read_text() == "not a folder"


def test_a_profile_whose_fid_reference_split_does_not_exist_is_refused_before_writing(tmp_path, monkeypatch):
    import ablations.sweep as sweep_module

    smoke = load_profile("smoke")
    monkeypatch.setattr(sweep_module, "load_profile", lambda name: {**smoke, "eval": {**smoke["eval"], "reference_split": "val"}})
    with pytest.raises(ConfigError, match="reference split: unknown value 'val'; allowed: 'train', 'test'"):
        sweep("smoke", tmp_path / "smoke", None, None, "grid", None, None)
    assert not (tmp_path / "smoke").exists()


def test_a_sweep_without_its_dataset_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the paper profile reads data/imagenet128_latents.npz relative to here
    with pytest.raises(ConfigError, match="data.path: latents file data/imagenet128_latents.npz does not exist"):
        sweep("paper", tmp_path / "paper", None, None, "grid", None, None)
    assert not (tmp_path / "paper").exists()


def test_each_sweep_of_a_process_logs_into_its_own_store(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI: a learning-rate search, one sweep per rate in one
    process, once logged every rate into the first rate's store."""
    import mlflow

    import ablations.sweep as sweep_module

    class Opened(Exception):
        pass

    def opened(out, study_name, storage_url, tracking_uri, sampler, cells, precisions):
        raise Opened(tracking_uri)

    monkeypatch.setattr(sweep_module, "open_stores", opened)
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # restored after the test, with the variable
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'first' / 'mlflow.db'}")  # what the first sweep leaves behind
    with pytest.raises(Opened) as second:
        sweep("smoke", tmp_path / "second", None, None, "grid", None, CELLS[:1])
    assert second.value.args[0] == f"sqlite:///{tmp_path / 'second' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-the-shell.db")  # set by the user: the command line obeys it
    with pytest.raises(Opened) as shell:
        sweep_module.main(["--profile", "smoke", "--out", str(tmp_path / "third"), "--cells", CELLS[0]])
    assert shell.value.args[0] == "sqlite:///from-the-shell.db"


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    with every_core():  # two cells' training and FID sets: real work, the session's slowest fixture on one core
        sweep("smoke", out, None, None, "grid", None, CELLS)
    return out


@pytest.fixture(scope="module")
def cache_of_module_fixtures():
    return os.environ.get("LIT_MPDIT_CACHE")


def test_every_cell_has_a_convergence_curve_whose_last_point_is_the_final_evaluations_images(smoke_sweep):
    curves = pd.read_csv(smoke_sweep / "fid_curves.csv")
    for cell in CELLS:
        record = json.loads((smoke_sweep / "cells" / cell / "result.json").read_text())
        sampled = pd.read_csv(smoke_sweep / "cells" / cell / "metrics.csv").dropna(subset=["val/fid"])
        assert list(sampled.step) == [6]  # the last step is not sampled twice
        assert record["fid_curve_final"]["step"] == 12 and record["fid_curve_final"]["n_fake"] == 16
        # FID-16 of the same images is biased far above their FID-32
        assert record["fid_curve_final"]["fid"] > record["fid"]
        c = Cell.from_id(cell)
        steps = curves[(curves.conditioning == c.conditioning) & (curves.mp == c.mp)].step
        assert list(steps) == [6, 12]


def test_a_cells_wall_time_is_split_into_training_steps_and_the_overhead(smoke_sweep):
    for cell in CELLS:
        record = json.loads((smoke_sweep / "cells" / cell / "result.json").read_text())
        s = record["seconds"]
        assert 0 < s["training_steps"] and 0 < s["fid_curve"] and 0 < s["final_evaluation"]
        assert s["training_steps"] + s["fid_curve"] + s["final_evaluation"] < s["wall"] == record["wall_s"]
        assert record["overhead_fraction"] == pytest.approx(1 - s["training_steps"] / s["wall"])
    params = pd.read_csv(smoke_sweep / "params_table.csv")
    assert params.overhead_pct.between(0, 100).all()


def test_module_fixtures_use_the_tests_private_fid_cache(cache_of_module_fixtures, tmp_path_factory):
    # Issue 6: the chaos test's uninterrupted sweep (a module fixture) read the repository's results/cache/fid
    # and the killed sweep a fresh private cache: other reference features, every cell's FID off by ~1%.
    assert cache_of_module_fixtures == os.environ["LIT_MPDIT_CACHE"]
    assert Path(cache_of_module_fixtures).is_relative_to(tmp_path_factory.getbasetemp())


def test_smoke_sweep_writes_every_table_and_plot(smoke_sweep):
    for name in ["fid_table", "params_table"]:
        for suffix in [".csv", ".md", ".tex"]:
            assert (smoke_sweep / f"{name}{suffix}").stat().st_size > 0
    for plot in ["fid_per_cell", "fid_vs_params", "loss_curves", "magnitude_curves"]:
        assert (smoke_sweep / f"{plot}.png").stat().st_size > 0
    claims = json.loads((smoke_sweep / "claims.json").read_text())  # one seed: no claim can be decided
    assert {c["claim"] for c in claims} == {1, 2} and all(c["verdict"] == "inconclusive" for c in claims)
    assert "Rules:" in (smoke_sweep / "claims.md").read_text()
    fids = pd.read_csv(smoke_sweep / "fid_table.csv")
    assert len(fids) == 2 and fids.fid.notna().all() and (fids.ci_low <= fids.fid).all() and (fids.fid <= fids.ci_high).all()
    params = pd.read_csv(smoke_sweep / "params_table.csv").set_index("conditioning")
    for cell in CELLS:
        c = Cell.from_id(cell)
        with torch.device("meta"):
            expected = sum(p.numel() for p in build_dit("T/4", input_size=28, in_channels=1, num_classes=10, conditioning=c.conditioning, mp=c.mp).parameters())
        assert params.loc[c.conditioning, "params"] == expected


def test_rerun_reads_finished_cells_back_without_training(smoke_sweep, capsys):
    results = {c: smoke_sweep / "cells" / c / "result.json" for c in CELLS}
    before = {c: (p.stat().st_mtime_ns, json.loads(p.read_text())) for c, p in results.items()}
    table, run = (smoke_sweep / "fid_table.csv").read_text(), (smoke_sweep / "sweep_run.json").read_text()
    capsys.readouterr()
    sweep("smoke", smoke_sweep, None, None, "grid", None, CELLS)
    assert {c: (p.stat().st_mtime_ns, json.loads(p.read_text())) for c, p in results.items()} == before
    assert (smoke_sweep / "fid_table.csv").read_text() == table
    assert "all 2 cells finished in an earlier run" in capsys.readouterr().out
    assert (smoke_sweep / "sweep_run.json").read_text() == run  # still the record of the run that trained


def test_a_copied_sweep_shows_its_mlflow_runs_with_their_artifacts(smoke_sweep, tmp_path):
    import shutil

    from mlflow.tracking import MlflowClient

    from ablations.report import main as report

    copy = tmp_path / "elsewhere" / "smoke"
    shutil.copytree(smoke_sweep, copy, ignore=shutil.ignore_patterns("checkpoints"))  # what a clone has
    report([str(copy)])  # make report: rebuilds the tables and points the store at the copy's artifacts
    client = MlflowClient(tracking_uri=f"sqlite:///{copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lit_mpdit-smoke")
    assert experiment.artifact_location.startswith((copy / "mlartifacts").resolve().as_uri())
    runs = client.search_runs([experiment.experiment_id])
    cell_runs = [r for r in runs if r.data.params.get("cell") in CELLS]
    assert len(cell_runs) == len(CELLS)
    for run in cell_runs:
        local = client.download_artifacts(run.info.run_id, "result.json", str(tmp_path / run.info.run_id))
        assert json.loads(Path(local).read_text())["cell"] == run.data.params["cell"]
        assert str(copy.resolve()) in run.info.artifact_uri


def test_notebook_regenerates_the_plots_from_the_tracked_runs(smoke_sweep, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "compare_ablations.ipynb", as_version=4)
    env = {"SWEEP_DIR": str(smoke_sweep), "PROFILE": "smoke", "NOTEBOOK_OUT": str(tmp_path), "LIT_MPDIT_ROOT": str(ROOT)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert (tmp_path / "fid_per_cell.png").stat().st_size > 0 and (tmp_path / "fid_vs_params.png").stat().st_size > 0


def test_a_diverging_cell_is_reported_failed_with_its_reason_and_the_rest_completes(smoke_sweep, tmp_path, monkeypatch, capsys):
    import shutil

    import ablations.sweep as sweep_module

    smoke = load_profile("smoke")
    monkeypatch.setattr(sweep_module, "load_profile", lambda name: {**smoke, "lr": {"standard": 1e30}})  # rung A diverges
    out = tmp_path / "diverging"
    shutil.copytree(smoke_sweep / "cells" / "rotation+scale-E-s0", out / "cells" / "rotation+scale-E-s0")  # done: read back
    sweep("smoke", out, None, None, "grid", None, CELLS)
    assert "[sweep] adaln-A-s0: failed, not retried: non-finite training loss" in capsys.readouterr().out
    table = pd.read_csv(out / "fid_table.csv").set_index("mp")
    assert table.loc["A", "status"].startswith("failed: non-finite training loss") and "failed: non-finite" in (out / "fid_table.md").read_text()
    assert pd.isna(table.loc["A", "fid"])
    assert table.loc["E", "status"] == "complete" and table.loc["E", "fid"] > 0
    failed = json.loads((out / "cells" / "adaln-A-s0" / "result.json").read_text())
    assert failed["status"] == "failed" and "step" in failed["reason"]
    sweep("smoke", out, None, None, "grid", None, CELLS)  # a rerun does not retry a deterministic failure
    assert json.loads((out / "cells" / "adaln-A-s0" / "result.json").read_text()) == failed


def test_a_cell_that_keeps_raising_is_reported_failed_and_the_sweep_exits_non_zero(smoke_sweep, tmp_path, monkeypatch, capsys):
    import shutil

    import ablations.sweep as sweep_module

    real = sweep_module.run_cell

    def run_cell(profile, cell, cell_dir, **kwargs):
        if cell.id == "adaln-A-s0":
            raise RuntimeError("disk on fire")
        return real(profile, cell, cell_dir, **kwargs)

    monkeypatch.setattr(sweep_module, "run_cell", run_cell)
    out = tmp_path / "raising"
    shutil.copytree(smoke_sweep / "cells" / "rotation+scale-E-s0", out / "cells" / "rotation+scale-E-s0")  # done: read back
    with pytest.raises(SystemExit) as exit_:
        sweep_module.main(["--profile", "smoke", "--out", str(out), "--cells", ",".join(CELLS)])
    assert exit_.value.code == 1
    assert "adaln-A-s0: raised 3 times, last: RuntimeError: disk on fire" in capsys.readouterr().err
    table = pd.read_csv(out / "fid_table.csv").set_index("mp")
    assert table.loc["A", "status"] == "failed: raised 3 times, last: RuntimeError: disk on fire"
    assert table.loc["E", "status"] == "complete"


def _open_stores(out: str, start, results) -> None:
    from ablations.sweep import open_stores

    start.wait()  # all at once: without the lock, two of three crash creating the SQLite schemas
    try:
        open_stores(Path(out), "race", f"sqlite:///{out}/optuna.db", f"sqlite:///{out}/mlflow.db", None, ["a"])
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the parent
        results.put(f"{type(e).__name__}: {e}"[:300])


def test_workers_started_together_create_the_stores_once(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("forkserver")  # a clean process per worker, the imports paid once
    context.set_forkserver_preload(["ablations.sweep", "mlflow", "optuna"])
    start, results = context.Barrier(3), context.Queue()
    workers = [context.Process(target=_open_stores, args=(str(tmp_path), start, results)) for _ in range(3)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join()
    assert outcomes == ["ok"] * 3


def test_a_sweep_of_other_cells_into_a_folder_is_refused_before_work(tmp_path, monkeypatch):
    from ablations.sweep import cell_grid, open_stores

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # open_stores sets it: restored after the test
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = open_stores(tmp_path, "lit_mpdit-smoke", storage, tracking, cell_grid(CELLS[:1]), CELLS[:1])
    study.optimize(lambda trial: float(len(trial.suggest_categorical("cell", CELLS[:1]))), n_trials=1)
    # 1.6e-2 and 2e-2 once shared a learning-rate folder: the second cell's trials all failed, without end
    with pytest.raises(ConfigError, match=f"--cells: {tmp_path} holds a sweep of the cells {CELLS[0]}; allowed: those cells, or another --out"):
        sweep("smoke", tmp_path, storage, tracking, "grid", None, CELLS[1:])
    assert len(study.get_trials()) == 1 and study.user_attrs["cells"] == CELLS[:1]  # nothing written


def test_a_trial_that_raises_before_choosing_its_cell_stops_the_grid():
    import optuna

    from ablations.sweep import RAISED, cell_grid, run_grid

    study = optuna.create_study(sampler=cell_grid(CELLS))

    def objective(trial):
        trial.set_user_attr(RAISED, "ValueError: CategoricalDistribution does not support dynamic value space.")
        raise ValueError("CategoricalDistribution does not support dynamic value space.")

    with pytest.raises(RuntimeError, match="a trial raised before choosing its cell: ValueError: Categorical"):
        run_grid(study, objective, CELLS)
    assert len(study.trials) == 1


def test_workers_started_together_both_pass_the_writability_probe(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from ablations.sweep import make_out

    out = tmp_path / "shared"  # a probe file with one fixed name: one worker deleted it under the other (CI, PostgreSQL test)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: make_out(out), range(400)))  # raises if any probe failed
    assert out.is_dir() and not any(out.iterdir())


def test_the_grid_trains_its_cells_in_order_and_a_crashed_cell_again_before_the_next():
    import optuna

    from ablations.sweep import cell_grid, run_grid

    study = optuna.create_study(sampler=cell_grid(CELLS + ["rotation-A-s0"]))
    trained = []

    def objective(trial):  # the second trial's worker dies; its cell is queued again
        trained.append(trial.suggest_categorical("cell", CELLS + ["rotation-A-s0"]))
        if len(trained) == 2:
            raise RuntimeError("worker killed")
        return 0.0

    run_grid(study, objective, CELLS + ["rotation-A-s0"])
    assert trained == [CELLS[0], CELLS[1], CELLS[1], "rotation-A-s0"]  # not the grid sampler's shuffle


def test_killed_workers_never_use_up_a_cells_attempts_but_raising_trials_do():
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from ablations.sweep import MAX_ATTEMPTS, RAISED, cell_states

    study = optuna.create_study()
    space = {"cell": CategoricalDistribution(CELLS)}
    killed, raising = CELLS
    for _ in range(MAX_ATTEMPTS + 2):  # the chaos test's four kills once landed in one cell: it was reported failed
        study.add_trial(create_trial(state=TrialState.FAIL, params={"cell": killed}, distributions=space))
    for attempt in range(MAX_ATTEMPTS):
        assert raising not in cell_states(study)["finished"]
        study.add_trial(create_trial(state=TrialState.FAIL, params={"cell": raising}, distributions=space, user_attrs={RAISED: "RuntimeError: boom"}))
    states = cell_states(study)
    assert killed not in states["finished"] and raising in states["finished"]


def test_a_trial_that_raises_is_marked_so(tmp_path, monkeypatch):
    import optuna

    from ablations import sweep as driver

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(driver, "run_cell", broken)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    study = optuna.create_study()
    study.set_user_attr("cells", CELLS)
    study.enqueue_trial({"cell": CELLS[0]})
    objective = driver.make_objective(driver.load_profile("smoke"), tmp_path, tracking, None)
    study.optimize(objective, n_trials=1, catch=(RuntimeError,))
    assert study.trials[0].user_attrs[driver.RAISED] == "RuntimeError: boom"


def test_a_cell_killed_during_evaluation_is_evaluated_again_to_the_same_fid(smoke_sweep, tmp_path, all_cores):
    import shutil

    from ablations.cells import run_cell

    finished = smoke_sweep / "cells" / "adaln-A-s0"
    killed = tmp_path / "adaln-A-s0"
    shutil.copytree(finished, killed, ignore=shutil.ignore_patterns("result.json"))  # training done, no result
    again = run_cell(load_profile("smoke"), Cell.from_id("adaln-A-s0"), killed)
    first = json.loads((finished / "result.json").read_text())
    assert again["steps"] == first["steps"] and again["fid"] == first["fid"]


def test_grid_progress_line_counts_the_cells_left_at_the_median_pace_of_this_runs_cells():
    import time

    from ablations.sweep import progress_line

    started = time.time() - 600  # ten minutes ago
    assert progress_line(5, 21, 1, 0, started, []).endswith("ETA unknown")
    line = progress_line(7, 21, 0, 3, started, [420.0, 380.0, 400.0])
    assert line.startswith("[grid] 7/21 cells finished (3 this run), 0 running, 10.0 min elapsed") and line.endswith("ETA 93 min")  # 14 x 400 s
    assert progress_line(7, 21, 1, 3, started, [420.0, 380.0, 400.0]).endswith("ETA 47 min")  # two workers share them
    # until a cell has finished: the committed run's pace
    assert progress_line(0, 21, 0, 0, started, [], committed=420.0).endswith("ETA ~147 min (committed run's pace)")
    assert progress_line(1, 21, 0, 1, started, [420.0], committed=300.0).endswith("ETA 140 min")  # a measured cell wins
    assert progress_line(1, 3, 0, 1, started, [20.0]).endswith("ETA 0.7 min")  # a tenth of a minute under ten
    assert progress_line(21, 21, 0, 3, started, [864.0]).endswith("done")


def test_the_committed_pace_counts_only_cells_trained_in_this_runs_precision():
    from ablations.sweep import committed_pace, recurring_s

    records = [json.loads(p.read_text()) for p in (ROOT / "results" / "ablations" / "cpu" / "cells").glob("*/result.json")]
    assert {r["train_precision"] for r in records} == {"bf16-mixed"}  # the committed grid: a machine where bf16 paid
    assert committed_pace("cpu", "bf16-mixed") == pytest.approx(sorted(recurring_s(r) for r in records)[len(records) // 2])
    assert committed_pace("cpu", "32-true") is None  # an fp32 machine's ETA waits for its own first cell


def test_a_cells_one_time_costs_are_left_out_of_the_pace_of_the_cells_after_it(tmp_path):
    import optuna

    from ablations.sweep import cell_walls

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    for attrs in ({"wall_s": 50.0}, {"wall_s": 864.0, "one_time_s": 450.0}, {"wall_s": 420.0, "one_time_s": 2.0}, {"wall_s": 90.0, "resumed_from_step": 600}):
        trial = study.ask()
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        study.tell(trial, 1.0)
    assert cell_walls(study, first_trial=1) == [414.0, 418.0]  # an earlier run's trial and a resumed cell left out


def test_throughputs_warmup_excess_is_what_the_skipped_steps_took_beyond_the_measured_pace():
    from lit_mpdit.callbacks import Throughput

    meter = Throughput(skip_steps=2)
    meter.warmup_seconds, meter.seconds, meter.steps = 30.0, 10.0, 20  # 0.5 s a step; the first two took 30 s
    assert meter.warmup_excess == 29.0
    meter.warmup_seconds = 0.5  # faster than the pace: nothing to leave out
    assert meter.warmup_excess == 0.0


def test_the_sweeps_log_leaves_out_known_lines_and_keeps_genuine_warnings():
    import logging
    import warnings

    from optuna.exceptions import ExperimentalWarning

    from ablations.sweep import QUIET_LOGGERS, quiet_log

    before = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_log():
            warnings.warn("Argument ``heartbeat_interval`` is an experimental feature. The interface can change.", ExperimentalWarning)
            warnings.warn("Argument ``other`` is an experimental feature.", ExperimentalWarning)
            warnings.warn("a genuine one", UserWarning)
            assert not logging.getLogger("lightning.pytorch.utilities.rank_zero").isEnabledFor(logging.INFO)
            assert logging.getLogger("optuna").isEnabledFor(logging.WARNING)  # a failed trial's message
    assert [str(w.message) for w in seen] == ["Argument ``other`` is an experimental feature.", "a genuine one"]
    assert {name: logging.getLogger(name).level for name in QUIET_LOGGERS} == before


@pytest.fixture(scope="module")
def smoke_sweep_log(tmp_path_factory):
    """A smoke sweep of three cells from the command line, its output as a log file has it (not a terminal). A
    fresh FID cache: its first cell pays for the reference features, as a fresh grid's does."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("smoke_log")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"LIT_MPDIT_CACHE": str(tmp / "cache")}
    command = [sys.executable, "-m", "ablations.sweep", "--profile", "smoke", "--cells", ",".join(LOG_CELLS), "--out", str(tmp / "out")]
    run = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-3000:]
    return run.stdout


def test_a_sweeps_log_holds_its_cells_start_and_end_and_the_progress_only(smoke_sweep_log):
    lines = smoke_sweep_log.splitlines()
    assert not [line for line in lines if "warn" in line.lower()]
    assert "LightningCLI's args parameter" not in smoke_sweep_log
    assert [line for line in lines if not line.startswith(("[grid] ", "[sweep] "))] == []  # no banners, tables, info
    assert len(lines) == 3 * len(LOG_CELLS) + 2  # per cell its start, its end and the progress; the first progress, the tables


def test_the_eta_after_the_first_cell_is_within_a_factor_1_5_of_the_time_left(smoke_sweep_log):
    import re

    grid = r"^\[grid\] (\d+)/\d+ cells finished .*, ([\d.]+) min elapsed, (?:ETA ~?([\d.]+) min.*|ETA unknown|done)$"
    progress = re.findall(grid, smoke_sweep_log, re.M)
    elapsed = {int(done): float(minutes) for done, minutes, _ in progress}
    eta = {int(done): float(minutes) for done, _, minutes in progress if minutes}
    assert sorted(elapsed) == list(range(len(LOG_CELLS) + 1)) and set(range(1, len(LOG_CELLS))) <= set(eta)
    for done in range(1, len(LOG_CELLS)):  # the first cell paid for the reference features; the ETA after it counts them once
        left = elapsed[len(LOG_CELLS)] - elapsed[done]
        assert left / 1.5 <= eta[done] <= 1.5 * left, f"after {done} cells: ETA {eta[done]} min, {left:.1f} min left"


@pytest.mark.parametrize("native", [True, False])
def test_the_cpu_profiles_auto_precision_is_bf16_only_where_it_is_native(monkeypatch, native):
    from ablations.cells import precisions_of
    from lit_mpdit import runtime

    monkeypatch.setattr(runtime, "bf16_pays", lambda: native)
    expected = {"train": "bf16-mixed", "inception": "bf16", "sample": "bf16"} if native else {"train": "32-true", "inception": "fp32", "sample": "fp32"}
    assert precisions_of(load_profile("cpu")) == expected
    fp32 = {"train": "32-true", "inception": "fp32", "sample": "fp32"}
    assert precisions_of(load_profile("smoke")) == fp32 and precisions_of(load_profile("cpu_fp32")) == fp32  # fp32 everywhere


def test_a_sweep_resumed_where_its_auto_precision_resolves_otherwise_is_refused(tmp_path, monkeypatch):
    from ablations.sweep import cell_grid, open_stores

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    bf16 = {"train": "bf16-mixed", "inception": "bf16", "sample": "bf16"}
    study = open_stores(tmp_path, "lit_mpdit-cpu", storage, tracking, cell_grid(CELLS), CELLS, bf16)
    study.optimize(lambda trial: float(len(trial.suggest_categorical("cell", CELLS))), n_trials=1)
    assert open_stores(tmp_path, "lit_mpdit-cpu", storage, tracking, cell_grid(CELLS), CELLS, bf16).user_attrs["precisions"] == bf16
    fp32 = {"train": "32-true", "inception": "fp32", "sample": "fp32"}
    with pytest.raises(ConfigError, match=f"--out: {tmp_path} trains in train bf16-mixed, inception bf16, sample bf16 .* would run train 32-true"):
        open_stores(tmp_path, "lit_mpdit-cpu", storage, tracking, cell_grid(CELLS), CELLS, fp32)
    study.optimize(lambda trial: float(len(trial.suggest_categorical("cell", CELLS))), n_trials=1)  # every cell finished
    assert open_stores(tmp_path, "lit_mpdit-cpu", storage, tracking, cell_grid(CELLS), CELLS, fp32).user_attrs["precisions"] == bf16  # read back anywhere


@pytest.mark.parametrize("search", [None, "paper"])
def test_the_cpu_profiles_learning_rates_are_the_committed_searchs_best(search):
    """The ladder's search chooses a rate per family, the paper models' search one per model (its rung-axis
    value, e.g. morph/A): a rate is chosen only where the best of the committed search is not at its edge."""
    from ablations.cells import grid_flags_of
    from ablations.lr_search import search_spec
    from lit_mpdit.config import split_overrides

    folder = HERE.parent / "results" / "ablations" / "lr_search" / ("cpu" + (f"_{search}" if search else ""))
    profile, spec = load_profile("cpu"), search_spec("cpu", search)
    if not (folder / "lr_table.csv").exists():  # not begun: every model takes its family's rate
        assert not set(profile["lr"]) & {split_overrides(Cell.from_id(c).mp)[0] for c in spec["cells"]}
        return
    table = pd.read_csv(folder / "lr_table.csv")
    assert set(table.cell) <= set(spec["cells"]) and (search or set(table.cell) == set(spec["cells"]))
    for row in table[table.best_for_cell].itertuples():
        key = split_overrides(Cell.from_id(row.cell).mp)[0] if search else grid_flags_of(row.cell).family
        if row.best_at_edge:  # still being searched: the optimum may lie outside the grid, so no rate is chosen yet
            assert key not in profile["lr"], f"profile cpu chose a rate for {key}, whose best ({row.lr}) is at the search's edge"
        else:
            assert profile["lr"][key] == pytest.approx(row.lr), f"profile cpu's {key} rate is not {row.cell}'s best, {row.lr}"


def test_the_horizon_profile_is_the_cpu_profile_four_times_longer_in_the_same_shape():
    cpu, long = load_profile("cpu"), load_profile("cpu_long")
    steps = lambda p: p["fit"]["trainer"]["max_steps"]  # noqa: E731
    assert steps(long) == 4 * steps(cpu) and long["fit"]["model"] == cpu["fit"]["model"] and long["lr"] == cpu["lr"]
    assert long["ema_start"] / steps(long) == cpu["ema_start"] / steps(cpu)
    assert 1 / (1 - long["ema_decay"]) == pytest.approx(4 / (1 - cpu["ema_decay"]))  # the EMA's horizon in steps
    assert long["eval"] == cpu["eval"] and steps(long) % long["checkpoint_every"] == 0
    cells = ["adaln-A-s0", "adaln-E-s0"]
    assert all(c in [x.id for x in grid_cells(load_yaml(HERE / "grid.yaml"), long["seeds"], long["claim_seeds"])] for c in cells)
