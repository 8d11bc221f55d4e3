"""Imports: no import cycle among the modules of lit_mpdit and ablations, and the data package's names resolve
where configs, checkpoints and callers name them (`lit_mpdit.data.FashionMNISTDataModule` and every other name
of `lit_mpdit.data.__all__`).

The import graph is read from the source with `ast`, not by importing: every `import` and `from ... import`
counts, at module level or inside a function (a function-level import still closes a cycle when it runs).
"""
from __future__ import annotations

import ast
import importlib
import json
import pkgutil
from pathlib import Path

import lightning as L
import pytest
from jsonargparse import ArgumentParser

import ablations
import lit_mpdit
import lit_mpdit.data

DATA = "lit_mpdit.data"
PACKAGES = (lit_mpdit, ablations)  # the library and the sweep driver: a cycle within either, or between them, fails

# The public names of lit_mpdit/data.py before it became a package: each must still be importable from it.
FORMER_NAMES = [
    "Batch", "Indices", "cache_dir", "download", "keep_batch", "to_unit_range", "BatchDataset", "ImageDataset",
    "TensorImageDataset", "load_image", "ImageFileDataset", "LatentDataset", "held_out_split", "EpochShuffle",
    "HeldOutDataModule", "draw_images", "ImageDataModule", "FASHION_MNIST_FILES", "FASHION_MNIST_NAMES",
    "FASHION_MNIST_URL", "FASHION_MNIST_SYSTEM_DIR", "FASHION_MNIST_CLASSES", "FASHION_MNIST_HOW", "IDX_UNSIGNED_BYTE",
    "read_idx", "idx_layout", "check_idx_size", "load_fashion_mnist", "FashionMNISTDataModule", "SAMPLE_PATH",
    "FashionMNISTSampleDataModule", "CIFAR10_URL", "CIFAR10_FOLDER", "CIFAR10_FILES", "CIFAR10_NAMES", "CIFAR10_CLASSES",
    "CIFAR10_HOW", "read_cifar_batch", "CIFAR10DataModule", "IMAGE_SUFFIXES", "scan_image_folder",
    "ImageFolderDataModule", "LATENT_KEYS", "save_latents", "load_latents", "LatentsDataModule", "DATAMODULES",
    "build_datamodule", "datamodule_name", "instantiate_datamodule", "reference_name",
]  # fmt: skip
CLASSES = [
    "FashionMNISTDataModule", "FashionMNISTSampleDataModule", "CIFAR10DataModule", "ImageFolderDataModule",
    "LatentsDataModule", "HeldOutDataModule", "ImageDataModule", "EpochShuffle", "BatchDataset", "ImageDataset",
    "TensorImageDataset", "ImageFileDataset", "LatentDataset",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The import graph of the lit_mpdit and ablations packages


def package_modules() -> dict[str, Path]:
    """Every module of the `PACKAGES` → its source file."""

    def fail(name: str) -> None:
        raise ImportError(f"cannot import package {name} to list its modules")

    modules = {}
    for package in PACKAGES:
        modules[package.__name__] = Path(package.__file__)
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.", onerror=fail):
            modules[info.name] = Path(info.module_finder.find_spec(info.name).origin)
    return modules


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `name` (source `path`) imports, from anywhere in its source.

    `from P import n` imports module P.n when there is one, else P. Importing a module also runs its parent
    packages' `__init__`, so they count too, except those `name` itself belongs to (already imported before it).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `.` is this module's package, each further dot one package up
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            targets += [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]
    found: set[str] = set()
    for target in targets:
        while target and target not in known:  # `lit_mpdit.x.name` → `lit_mpdit.x`; modules outside vanish
            target = target.rpartition(".")[0]
        while target:
            if not in_package(name, target):
                found.add(target)
            target = target.rpartition(".")[0]
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def cyclic_groups(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def shortest_cycle(graph: dict[str, set[str]], group: list[str], start: str) -> list[str]:
    """One shortest import cycle of `group` through `start`: [start, b, ..., start]."""
    members = set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"{group} is not cyclic")


def describe(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """The modules of a cyclic group, then the shortest cycle through each of them (each cycle once)."""
    cycles = []
    for start in group:
        cycle = shortest_cycle(graph, group, start)[:-1]
        first = cycle.index(min(cycle))
        cycle = cycle[first:] + cycle[:first]  # the same cycle found from another module reads the same
        if cycle not in cycles:
            cycles.append(cycle)
    return [f"{len(group)} modules: {', '.join(group)}"] + [f"    {' -> '.join(c + c[:1])}" for c in cycles]


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert {DATA, f"{DATA}.base", f"{DATA}.fashion_mnist", f"{DATA}.latents", "lit_mpdit.cli"} <= set(graph)
    assert f"{DATA}.base" in graph[f"{DATA}.fashion_mnist"]  # a module-level import
    assert DATA in graph["lit_mpdit.evaluate"]  # a function-level import
    assert DATA not in graph[f"{DATA}.base"]  # a submodule does not depend on its own package's __init__
    assert {"ablations.cells", "ablations.report"} <= graph["ablations.sweep"]  # the report: a function-level import
    assert "ablations.artifacts" in graph["ablations.report"]  # once from ablations.sweep, which closed a cycle (issue 27)


def test_no_import_cycle_in_lit_mpdit_or_ablations():
    # Lower layers (network, diffusion, data, metrics, EMA, evaluation) never import the command line or the
    # callbacks, and the sweep's parts (cells, reports) never import the driver: every cycle among the modules of
    # lit_mpdit and ablations, at module level or inside a function, fails here.
    graph = import_graph()
    cycles = [line for group in cyclic_groups(graph) for line in describe(graph, group)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# ---------------------------------------------------------------------------------------------------------
# The names configs, checkpoints and callers use


def test_every_public_name_imports():
    assert sorted(FORMER_NAMES) == sorted(set(FORMER_NAMES))
    missing = sorted(set(FORMER_NAMES) - set(lit_mpdit.data.__all__))
    assert not missing, f"names lit_mpdit.data had and no longer exports: {missing}"
    for name in lit_mpdit.data.__all__:
        namespace: dict = {}
        exec(f"from lit_mpdit.data import {name}", namespace)  # the statement callers write
        assert namespace[name] is getattr(lit_mpdit.data, name)


@pytest.mark.parametrize("name", CLASSES)
def test_classes_resolve_at_their_module_and_at_the_package(name):
    cls = getattr(lit_mpdit.data, name)
    assert in_package(cls.__module__, DATA)
    assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls
    assert getattr(importlib.import_module(DATA), name) is cls  # `lit_mpdit.data.<Name>`, as configs spell it


def test_instantiate_datamodule_takes_the_package_path():
    dm = lit_mpdit.data.instantiate_datamodule(f"{DATA}.FashionMNISTSampleDataModule", {"val_size": 10}, "test")
    assert type(dm) is lit_mpdit.data.FashionMNISTSampleDataModule and lit_mpdit.data.datamodule_name(dm) == "fashion_mnist_sample"
    assert lit_mpdit.data.reference_name(dm, "train") == "fashion_mnist_sample:train"


@pytest.mark.parametrize("name", sorted(lit_mpdit.data.DATAMODULES))
def test_configs_and_checkpoints_record_the_package_path(name):
    """LightningCLI stores the class path jsonargparse resolves (in config.yaml and as the checkpoint's
    `_class_path`): a full path as given, a bare class name (`--data CIFAR10DataModule`) as the shortest path
    that imports the class, which must stay `lit_mpdit.data.<Name>`."""
    cls = lit_mpdit.data.DATAMODULES[name]
    required = {"image_folder": {"root": "images"}, "latents": {"path": "z.pt"}}.get(name, {})
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    for given, recorded in [(cls.__name__, f"{DATA}.{cls.__name__}"), (f"{DATA}.{cls.__name__}",) * 2]:
        spec = {"class_path": given, "init_args": required}
        assert parser.parse_args(["--data", json.dumps(spec)]).data.class_path == recorded


def test_the_latents_entry_points():
    import lit_mpdit.latents

    from lit_mpdit.data import latents

    assert lit_mpdit.latents.main is latents.main and lit_mpdit.latents.prepare_latents is latents.prepare_latents
    assert latents.LatentsDataModule is lit_mpdit.data.LatentsDataModule
