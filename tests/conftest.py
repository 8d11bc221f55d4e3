"""Test-wide settings: one intra-op thread (tests use tiny tensors, where thread start-up dominates
and oversubscribed cores of a shared CI machine slow everything down), every core for the few tests whose time
goes to real work (the Inception, a fit of a few dozen steps), and a private cache."""
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

CORES = torch.get_num_threads()  # torch's default, one per physical core, read before the session pins one


@contextmanager
def every_core() -> Iterator[None]:
    """Every core for a block: for module fixtures whose time goes to convolutions and matrix products (on two
    cores the Inception runs 1.9× faster than on one), which the test-wide single thread would starve."""
    previous = torch.get_num_threads()
    torch.set_num_threads(CORES)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def all_cores() -> Iterator[None]:
    """`every_core` for one test."""
    with every_core():
        yield


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Session-wide, so module-scoped fixtures (and the sweeps they start in subprocesses) see it too: a
    function-scoped one is set up after them, and a module fixture's sweep then read the repository's own
    results/cache/fid, which anything run from the repository root may have written — while the test
    compared with it, started later, computed its reference features afresh (issue 6's FID drift)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIT_MPDIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield
